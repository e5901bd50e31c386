"""LLM judge against a fake OpenAI-compatible endpoint; the priority queue."""

import collections
import threading
import types

import pytest

from klong_jax.grading.grade import grade_submission
from klong_jax.grading.judge import LLMJudge, candidate_files, parse_verdict, prior_requirements
from klong_jax.grading.judge_queue import JudgeQueue
from klong_jax.grading.rubric import rubric_from_dict
from tests.grading.fake_openai import serve

VALID1 = "# Expectations\nA fit.\n# Reality\nfit.py does it.\n# Score\n1\nThe fit is implemented."
VALID0 = "# Expectations\nx\n# Reality\nnothing\n# Score\n**0**\nNo implementation found."


def leaf(nid, req, cat="Code Development"):
  return {"id": nid, "requirements": req, "weight": 1, "sub_tasks": [], "task_category": cat}


RUBRIC = {"id": "root", "requirements": "paper", "weight": 1, "task_category": None,
          "sub_tasks": [leaf("v1", "VALID1 fit"), leaf("v0", "VALID0 plot"),
                        leaf("bad", "MALFORMED thing"), leaf("ref", "REFUSE thing"),
                        leaf("flaky", "FLAKY thing", "Result Analysis")]}


@pytest.fixture()
def endpoint():
  calls = collections.Counter()

  def respond(messages):
    sys_msg, user = messages[0]["content"], messages[-1]["content"]
    if "list the files" in sys_msg:
      return {"content": "fit.py\n./README.md\nnot_there.py"}
    crit = user.split("<criterion>")[1]
    for key in ("VALID1", "VALID0", "MALFORMED", "REFUSE", "FLAKY"):
      if key in crit:
        calls[key] += 1
        if key == "VALID1":
          assert "<FILE:fit.py>" in user and "def fit" in user
          assert "<reproduce.log>" not in user  # Code Development leaves skip the log
        if key == "FLAKY":
          assert "<reproduce.log>\nlog line" in user
          return {"content": "I think it is fine." if calls[key] == 1 else VALID1}
        return {"VALID1": {"content": VALID1}, "VALID0": {"content": VALID0},
                "MALFORMED": {"content": "# Score\nmaybe 0.7?"},
                "REFUSE": {"content": None, "refusal": "I can't help with that."}}[key]
    raise AssertionError(crit)

  url, reqs, stop = serve(respond)
  yield url, calls
  stop()


def test_parse_verdict():
  assert parse_verdict(VALID1) == (1.0, "The fit is implemented.")
  assert parse_verdict(VALID0)[0] == 0.0
  assert parse_verdict("## Score: 1.0 - good")[0] == 1.0
  for bad in ("", None, "# Score\n0.5", "score is great", "# Score\n10"):
    with pytest.raises(ValueError):
      parse_verdict(bad)


def test_llm_judge_valid_malformed_refused(endpoint, tmp_path):
  url, calls = endpoint
  (tmp_path / "fit.py").write_text("def fit(x):\n  return x\n")
  (tmp_path / "README.md").write_text("readme")
  (tmp_path / "reproduce.sh").write_text("python3 fit.py\n")
  task = types.SimpleNamespace(id="t", rubric=rubric_from_dict(RUBRIC), blacklist=[], config={},
                               paper_md="A paper about fitting.", addendum_md="",
                               judge_addendum_md="")
  judge = LLMJudge(base_url=url, model="fake", max_retries=2, retry_backoff_s=0.0,
                   max_concurrency=3)
  repro = types.SimpleNamespace(exit_code=0, output="log line", timed_out=False, duration_s=0.1)
  g = grade_submission(task, None, "/nowhere", reproduce_result=repro, judge=judge,
                       host_submission_dir=str(tmp_path))
  by = {lf.id: lf for lf in g.tree.leaves()}
  assert (by["v1"].score, by["v1"].valid_score) == (1.0, True)
  assert by["v1"].judge_metadata["files"][:2] == ["fit.py", "README.md"]
  assert (by["v0"].score, by["v0"].valid_score) == (0.0, True)
  assert (by["flaky"].score, by["flaky"].valid_score) == (1.0, True)
  assert calls["FLAKY"] == 2
  for lid, key in (("bad", "MALFORMED"), ("ref", "REFUSE")):
    assert calls[key] == 3  # retried max_retries times, then marked
    assert not by[lid].valid_score and by[lid].explanation.startswith("judge failure")
  assert "refused" in by["ref"].explanation
  assert g.judge_failures == 2
  assert g.score == pytest.approx(2 / 5)


def test_api_down_marks_failure(tmp_path):
  judge = LLMJudge(base_url="http://127.0.0.1:9/v1", max_retries=1, retry_backoff_s=0.0)
  task = types.SimpleNamespace(paper_md="p", addendum_md="", judge_addendum_md="")
  node = rubric_from_dict(leaf("x", "thing"))
  score, valid, expl, _ = judge.grade_leaf(task, node, str(tmp_path), None)
  assert (score, valid) == (0.0, False) and "API error" in expl


def test_candidate_files_and_prior(tmp_path):
  for p in ("a.py", "r.csv", "n.md", ".venv/x.py", "sub/b.sh", "img.png"):
    (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / p).write_text("x")
  assert candidate_files(str(tmp_path), "Code Development") == ["a.py", "n.md", "sub/b.sh"]
  assert candidate_files(str(tmp_path), "Result Analysis") == ["n.md", "r.csv"]
  pr = prior_requirements(rubric_from_dict(RUBRIC))
  assert pr["v1"] == ["paper"] and pr["v0"] == ["paper", "VALID1 fit"]


def test_queue_runs_lowest_priority_first_with_bounded_concurrency():
  q = JudgeQueue(max_concurrency=1)
  gate, order, running, peak = threading.Event(), [], [0], [0]
  lock = threading.Lock()

  def job(tag):
    def run():
      with lock:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
      if tag == "first":
        gate.wait(5)
      order.append(tag)
      with lock:
        running[0] -= 1
      return tag
    return run

  f0 = q.submit(job("first"), (0,))
  futs = [q.submit(job(t), p) for t, p in
          (("train-new", (1, 9)), ("train-old", (1, 2)), ("eval", (0, 5)), ("train-old2", (1, 2)))]
  gate.set()
  assert [f.result(5) for f in futs] and f0.result(5) == "first"
  assert order == ["first", "eval", "train-old", "train-old2", "train-new"]
  assert peak[0] == 1
  q.close()
  q4 = JudgeQueue(max_concurrency=4)
  barrier = threading.Barrier(4, timeout=5)
  assert [f.result(5) for f in [q4.submit(lambda: barrier.wait() >= 0) for _ in range(4)]]
  q4.close()

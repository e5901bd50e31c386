"""Workers on rubrics with LLM-judged leaves: refuse to start without a judge; judge verdicts
feed the reward; judge failures make the rollout an infra error (masked), never a silent 0."""

import json
import shutil

import pytest

from klong_jax.data import tokenizer
from klong_jax.data.schema import from_bytes
from klong_jax.rollout.worker import Worker, WorkerConfig, judge_leaves
from klong_jax.tasks import bundled_tasks_dir, load_task
from tests.grading.fake_openai import serve

VERDICT = "# Expectations\nA clear write-up.\n# Reality\nIt is there.\n# Score\n1\nGood."


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """arith-1 with one extra Result Analysis leaf that only a judge can grade."""
  d = tmp_path_factory.mktemp("tasks") / "arith-1"
  shutil.copytree(f"{bundled_tasks_dir()}/arith-1", d)
  rubric = json.loads((d / "rubric.json").read_text())
  rubric["sub_tasks"].append({
      "id": "arith-1/discussion", "requirements": "The results are discussed.", "weight": 1,
      "sub_tasks": [], "task_category": "Result Analysis", "finegrained_task_category": None})
  (d / "rubric.json").write_text(json.dumps(rubric))
  return str(d)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return tokenizer.default_tokenizer(tmp_path_factory.mktemp("tok")).path


def _worker(tmp_path, teacher_url, tok_path, task_dir, judge_url=""):
  return Worker(WorkerConfig.from_fields(
      server=teacher_url, tasks=task_dir, stream=str(tmp_path / "s"),
                             tokenizer=tok_path, group_size=1, backend="local", max_steps=4,
                             time_limit_s=60.0, reproduce_timeout_s=30.0, judge_url=judge_url,
                             judge_concurrency=1, worker="w"))


def test_refuses_to_start_without_a_judge(tmp_path, teacher_url, tok_path, task_dir):
  assert judge_leaves(load_task(task_dir)) == 1
  with pytest.raises(ValueError, match="need an LLM judge: pass --judge_url"):
    _worker(tmp_path, teacher_url, tok_path, task_dir).run([task_dir])


def _only_record(tmp_path):
  from klong_jax.data.shards import list_shards, read_shard
  (path,) = list_shards(str(tmp_path / "s" / "0"))
  (raw,) = list(read_shard(path))
  return from_bytes(raw)


def test_judge_verdict_counts_in_the_reward(tmp_path, teacher_url, tok_path, task_dir):
  def respond(messages):
    if "list the files" in messages[0]["content"]:
      return {"content": "solution.py\nreproduce.sh"}
    return {"content": VERDICT}
  url, reqs, stop = serve(respond)
  try:
    assert _worker(tmp_path, teacher_url, tok_path, task_dir, url).run([task_dir]) == 1
  finally:
    stop()
  t = _only_record(tmp_path)
  assert t.status == "completed" and t.reward == pytest.approx(1.0)
  assert t.metadata["grade"]["judge_failures"] == 0 and reqs


def test_judge_failure_makes_an_infra_error(tmp_path, teacher_url, tok_path, task_dir):
  def respond(messages):
    if "list the files" in messages[0]["content"]:
      return {"content": "solution.py"}
    return {"content": "# Score\nmaybe"}  # unparseable every time
  url, _, stop = serve(respond)
  try:
    _worker(tmp_path, teacher_url, tok_path, task_dir, url).run([task_dir])
  finally:
    stop()
  t = _only_record(tmp_path)
  assert t.status == "infra_error" and t.reward is None
  assert t.metadata["grade"]["judge_failures"] == 1

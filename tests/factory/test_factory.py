"""Research-Factory stages: ingest (tiny PDF made here), build (fake LLM), distill (scripted
teacher through the real scaffold + local sandbox + shards)."""

import dataclasses
import json
import os
import time

import pytest

from klong_jax.factory import build as build_lib
from klong_jax.factory import papers
from klong_jax.factory.distill import DistillConfig, distill, format_histogram, score_histogram
from klong_jax.tasks import load_task
from tests.grading.fake_openai import serve

LINES = ["Tiny Adaptive Widgets", "Proceedings of ICML 2024",
         "Code: https://github.com/foo/widgets.", "Preprint arXiv:2401.12345",
         "We propose widgets."]


def make_pdf(path, lines):
  """A minimal one-page PDF with Helvetica text lines (hand-written objects + xref)."""
  ops = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(
      f"({ln}) Tj T*" for ln in lines) + " ET"
  objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
          "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
          "/Resources << /Font << /F1 5 0 R >> >> >>",
          f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream",
          "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
  out, offsets = b"%PDF-1.4\n", []
  for i, o in enumerate(objs, 1):
    offsets.append(len(out))
    out += f"{i} 0 obj\n{o}\nendobj\n".encode()
  xref = len(out)
  out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
  out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
  out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
  path.write_bytes(out)


def test_ingest_pdf_and_markdown(tmp_path):
  pdf = tmp_path / "widgets.pdf"
  make_pdf(pdf, LINES)
  d = str(tmp_path / "tasks" / "widgets")
  meta = papers.ingest(str(pdf), d)
  text = open(os.path.join(d, "paper.md")).read()
  assert "We propose widgets." in text
  assert meta["title"] == "Tiny Adaptive Widgets"
  assert (meta["venue"], meta["year"], meta["arxiv_id"]) == ("ICML", 2024, "2401.12345")
  assert meta["code_urls"] == ["https://github.com/foo/widgets"]
  mtime = os.path.getmtime(os.path.join(d, "paper.md"))
  assert papers.ingest(str(pdf), d) == meta  # idempotent: nothing rewritten
  assert os.path.getmtime(os.path.join(d, "paper.md")) == mtime
  md = tmp_path / "p.md"
  md.write_text("# A Markdown Paper\n\nNeurIPS '23. See https://gitlab.com/a/b.git\n")
  m2 = papers.ingest(str(md), str(tmp_path / "tasks" / "p"))
  assert (m2["title"], m2["venue"], m2["year"]) == ("A Markdown Paper", "NeurIPS", 2023)
  assert m2["code_urls"] == ["https://gitlab.com/a/b"]
  with pytest.raises(papers.IngestError, match="unsupported"):
    (tmp_path / "x.docx").write_text("x")
    papers.ingest(str(tmp_path / "x.docx"), str(tmp_path / "t"))


GOOD = {"addendum": "Use 3 seeds.", "rubric": {
    "id": "r", "requirements": "Widgets reproduced", "weight": 1, "task_category": None,
    "sub_tasks": [
        {"id": "a", "requirements": "widget code", "weight": 2, "sub_tasks": [],
         "task_category": "Code Development"},
        {"id": "b", "requirements": "widget score 0.9", "weight": 1, "sub_tasks": [],
         "task_category": "Result Analysis"}]}}


def _bad():
  bad = json.loads(json.dumps(GOOD))
  bad["rubric"]["sub_tasks"][1]["task_category"] = None
  return bad


def test_build_with_fake_llm(tmp_path):
  replies = iter([{"content": "Here you go: " + json.dumps(_bad())},
                  {"content": "```json\n" + json.dumps(GOOD) + "\n```"}])
  url, reqs, stop = serve(lambda msgs: next(replies))
  try:
    import openai
    client = openai.OpenAI(base_url=url, api_key="x")
    d = tmp_path / "widgets"
    d.mkdir()
    (d / "paper.md").write_text("\n".join(LINES))
    res = build_lib.build_task(str(d), client, "m", extra_blacklist=["https://x.org/data"])
    assert res["status"] == "built" and res["leaves"] == 2
    assert len(reqs) == 2 and "leaf node has no task_category" in reqs[1]["messages"][-1]["content"]
    t = load_task(str(d))
    assert t.blacklist == ["https://github.com/foo/widgets", "https://x.org/data"]
    assert t.addendum_md == "Use 3 seeds." and t.id == "widgets" and t.split == "train"
    assert t.config["arxiv_id"] == "2401.12345"
    assert build_lib.build_task(str(d), client, "m")["status"] == "exists" and len(reqs) == 2
    # Dedup: the same paper in an evaluation set is skipped, no LLM call.
    ev = tmp_path / "eval" / "w"
    ev.mkdir(parents=True)
    (ev / "config.yaml").write_text("id: w\ntitle: 'Tiny adaptive widgets'\n")
    d2 = tmp_path / "again"
    d2.mkdir()
    (d2 / "paper.md").write_text("\n".join(LINES))
    res = build_lib.build_task(str(d2), client, "m", index=build_lib.eval_index(
        [str(tmp_path / "eval")]))
    assert res["status"] == "skipped" and "evaluation set" in res["reason"] and len(reqs) == 2
    assert not (d2 / "rubric.json").exists()
  finally:
    stop()


def test_build_gives_up_with_clear_error(tmp_path):
  url, reqs, stop = serve(lambda msgs: {"content": "not json at all"})
  try:
    import openai
    (tmp_path / "paper.md").write_text("# P\n")
    with pytest.raises(build_lib.BuildError, match="no valid addendum"):
      build_lib.build_task(str(tmp_path), openai.OpenAI(base_url=url, api_key="x"), "m",
                           max_retries=1)
    assert len(reqs) == 2 and not (tmp_path / "rubric.json").exists()
  finally:
    stop()


def test_histogram():
  assert score_histogram([0.0, 0.05, 0.5, 1.0, 0.99]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
  assert "n=2" in format_histogram([0.1, 0.2])


def test_distill_with_scripted_teacher(tmp_path):
  from klong_jax.agent.policy_server import serve_in_thread
  from klong_jax.data.schema import from_bytes
  from klong_jax.data.shards import read_shard
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.factory.teacher import ScriptedTeacher
  from klong_jax.tasks import bundled_tasks_dir

  tok = default_tokenizer(tmp_path / "tok", 512).path
  teacher = ScriptedTeacher(0.5, seed=2, reasoning=True)  # A thinking teacher.
  calls = []
  url, stop = serve_in_thread(lambda m, t: calls.append(1) or teacher(m, t))
  try:
    cfg = DistillConfig.from_fields(
        tasks=bundled_tasks_dir(), server=url, out=str(tmp_path / "out"), backend="local",
        tokenizer=tok, episodes_per_task=2, threshold=0.5, max_tasks=2, time_limit_s=60)
    res = distill(cfg)
    n_calls = len(calls)
    assert len(res["scores"]) == 4 and sum(res["histogram"]) == 4
    kept = thought = 0
    for shard in res["shards"]:
      for raw in read_shard(shard):
        traj = from_bytes(raw)
        assert traj.reward >= 0.5 and traj.num_loss_tokens > 0
        assistant = [m for m in traj.messages if m["role"] == "assistant"]
        assert any(m.get("tool_calls") for m in assistant)
        assert all(m["reasoning_content"] for m in assistant)  # The teacher's reasoning is kept.
        thought += len(assistant)
        kept += 1
    assert kept == res["kept"] == sum(s >= 0.5 for s in res["scores"])
    assert res["reasoning_turns"] == thought >= 2 * kept > 0
    assert distill(cfg)["scores"] == res["scores"] and len(calls) == n_calls  # resumable
  finally:
    stop()


@pytest.mark.subprocess
def test_cli_ingest_and_jax_free(tmp_path):
  import subprocess
  import sys
  md = tmp_path / "paper.md"
  md.write_text("# CLI Paper\n\nICLR 2025, code at https://github.com/o/r\n")
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  out = subprocess.run([sys.executable, "-m", "klong_jax.factory", "ingest", f"--src={md}",
                        f"--out={tmp_path / 'tasks'}"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.load(open(tmp_path / "tasks" / "paper" / "metadata.json"))["year"] == 2025
  bad = subprocess.run([sys.executable, "-m", "klong_jax.factory", "cook"], capture_output=True,
                       text=True, env=env, timeout=120)
  assert bad.returncode != 0 and "ingest,build,distill" in bad.stderr
  code = ("import sys, klong_jax.grading, klong_jax.tasks, klong_jax.factory.__main__, "
          "klong_jax.factory.teacher, klong_jax.factory.distill, klong_jax.factory.build; "
          "sys.exit('jax' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


@pytest.mark.slow
def test_distill_infra_failures_fail_loudly_and_resume(tmp_path, monkeypatch):
  """A broken setup (here: every sandbox fails) stops distill after a few tasks with an error
  naming the cause; infra-only tasks are not marked done, so the re-run after the fix does
  them and keeps the tasks that finished before."""
  from klong_jax.agent.policy_server import serve_in_thread
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.factory import distill as distill_lib
  from klong_jax.factory.teacher import ScriptedTeacher
  from klong_jax.sandbox import base as sandbox_lib
  from klong_jax.tasks import bundled_tasks_dir

  tok = default_tokenizer(tmp_path / "tok", 512).path
  url, stop = serve_in_thread(ScriptedTeacher(1.0, seed=0))
  real, made = sandbox_lib.make_sandbox, []
  broken = {"on": True}

  def make_sandbox(*a, **kw):
    if broken["on"]:
      raise sandbox_lib.SandboxSetupError("sandbox image klong-sandbox:x is missing; run make "
                                          "image")
    made.append(1)
    return real(*a, **kw)
  monkeypatch.setattr(sandbox_lib, "make_sandbox", make_sandbox)
  try:
    cfg = DistillConfig.from_fields(
        tasks=bundled_tasks_dir(), server=url, out=str(tmp_path / "out"), backend="local",
        tokenizer=tok, episodes_per_task=1, threshold=0.5, max_tasks=2, time_limit_s=60)
    broken["on"] = False
    assert len(distill_lib.distill(cfg)["scores"]) == 2  # Two tasks finish before it breaks.
    broken["on"] = True
    cfg = dataclasses.replace(cfg, max_tasks=6)
    t0 = time.time()
    with pytest.raises(distill_lib.DistillInfraError, match="is missing; run make image"):
      distill_lib.distill(cfg)
    assert time.time() - t0 < 10  # Fails fast: a setup error is not retried with backoff.
    state = json.loads((tmp_path / "out" / distill_lib.STATE_FILE).read_text())
    assert len(state["tasks"]) == 2  # The infra-only tasks are not marked done.
    broken["on"] = False
    made.clear()
    res = distill_lib.distill(cfg)
    assert len(res["scores"]) == 6 and res["kept"] == 6
    assert len(made) == 4 * 2  # Only the 4 unfinished tasks ran (agent + grading sandbox each).
  finally:
    stop()

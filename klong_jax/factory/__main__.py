"""Research-Factory CLI: `python -m klong_jax.factory {ingest,build,distill} --flags`.

  ingest:  --src=paper.pdf|paper.md (repeatable) --out=TASKS_ROOT   (task dir = file stem)
  build:   --tasks=TASKS_ROOT --llm_url=URL --llm_model=M [--blacklist=URL,...] [--eval_set=DIR]
  distill: --tasks=DIR --out=DIR --tokenizer=PATH [--server=URL | --teacher_skill=0.9]
Every stage is resumable and idempotent over its task/output directory.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from klong_jax.rollout import episode_config

FLAGS = flags.FLAGS


def _define(kind: str, name: str, default, help_str: str) -> None:
  if name not in FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_str)


_define("multi_string", "src", [], "ingest: paper files (.pdf or .md).")
_define("string", "out", None, "ingest: tasks root; distill: output dir.")
_define("string", "tasks", None, "build/distill: tasks root.")
_define("string", "llm_url", None, "build: OpenAI-compatible base URL of the task-writing LLM.")
_define("string", "llm_model", "gpt-4o", "build: model name.")
_define("string", "api_key", os.environ.get("OPENAI_API_KEY", "EMPTY"), "API key.")
_define("list", "blacklist", [], "build: extra blacklisted URLs for every task.")
_define("multi_string", "eval_set", [], "build: evaluation task roots to dedup against.")
_define("bool", "force", False, "Redo stages that already finished.")
_define("string", "server", None, "distill: teacher URL; unset = scripted teacher.")
_define("float", "teacher_skill", 0.9, "distill: scripted teacher skill when --server is unset.")
_define("string", "teacher_mistakes", "",
        "distill: per-kind mistake rates of the scripted teacher, e.g. 'wrong_fn=0.3'.")
_define("integer", "seed", 0, "distill: scripted teacher seed.")
_define("bool", "teacher_reasoning", False,
        "distill: the scripted teacher also sends reasoning_content (a thinking teacher).")
_define("string", "tokenizer", None, "distill: tokenizer model path (for rendering).")
_define("integer", "episodes_per_task", 2, "distill: teacher episodes per task.")
_define("float", "threshold", 0.5, "distill: keep trajectories scoring at least this.")
_define("string", "split", "train", "distill: task split (train|rl|heldout|all).")
_define("integer", "max_tasks", 0, "distill: stop after this many tasks (0 = all).")
# distill: the teacher's episode (budgets, sandbox backend and --sandbox_limits, and the
# student's context policy: context_tokens = the SFT data.max_len, context_overlap = data.overlap,
# max_completion_tokens = data.completion_tokens), distill role defaults.
episode_config.define_flags("distill")

STAGES = ("ingest", "build", "distill")


def _need(name: str) -> str:
  val = getattr(FLAGS, name)
  if not val:
    raise app.UsageError(f"--{name} is required for this stage")
  return val


def run_ingest() -> None:
  from klong_jax.factory.papers import ingest
  out = _need("out")
  for src in _need("src"):
    d = os.path.join(out, os.path.splitext(os.path.basename(src))[0])
    meta = ingest(src, d, force=FLAGS.force)
    logging.info("ingested %s -> %s (%s)", src, d, meta.get("title"))
    print(f"{d}: {meta.get('title')!r} code_urls={meta.get('code_urls')}")


def run_build() -> None:
  import openai

  from klong_jax.factory.build import build_task, eval_index
  root = _need("tasks")
  client = openai.OpenAI(base_url=_need("llm_url"), api_key=FLAGS.api_key)
  index = eval_index(FLAGS.eval_set) if FLAGS.eval_set else None
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if os.path.exists(os.path.join(d, "paper.md")):
      res = build_task(d, client, FLAGS.llm_model, FLAGS.blacklist, index, force=FLAGS.force)
      print(f"{d}: {res}")


def run_distill() -> None:
  from klong_jax.factory.distill import (
    DistillConfig,
    DistillInfraError,
    distill,
    format_histogram,
  )
  stop = None
  server = FLAGS.server
  if not server:
    from klong_jax.agent.policy_server import serve_in_thread
    from klong_jax.factory.teacher import ScriptedTeacher, parse_rates
    teacher = ScriptedTeacher(FLAGS.teacher_skill, FLAGS.seed,
                              parse_rates(FLAGS.teacher_mistakes), FLAGS.teacher_reasoning)
    server, stop = serve_in_thread(teacher, model_name="teacher")
  try:
    res = distill(DistillConfig(
        tasks=_need("tasks"), server=server, out=_need("out"), tokenizer=_need("tokenizer"),
        episodes_per_task=FLAGS.episodes_per_task, threshold=FLAGS.threshold,
        split=None if FLAGS.split == "all" else FLAGS.split, max_tasks=FLAGS.max_tasks,
        episode=episode_config.from_flags("distill")))
  except DistillInfraError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    if stop is not None:
      stop()
  print(format_histogram(res["scores"]))
  print(f"kept {res['kept']} trajectories in {len(res['shards'])} shards under {FLAGS.out} "
        f"({res['reasoning_turns']} assistant turns with reasoning)")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in STAGES:
    raise app.UsageError(f"usage: python -m klong_jax.factory {{{','.join(STAGES)}}} --flags")
  {"ingest": run_ingest, "build": run_build, "distill": run_distill}[argv[1]]()


def entry() -> None:
  app.run(main)


if __name__ == "__main__":
  entry()

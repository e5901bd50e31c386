"""Why a policy scores what it scores on the bundled suite: per-rollout failure classes.

  python -m klong_jax.eval.diagnose runs/demo/eval_sft/stream [runs/demo/eval_rl/stream ...]

Reads trajectory shards (any stream or eval dir), classifies each bundled-suite rollout by what
went wrong -- a solution call that neither loads the task's `params.json` nor passes the paper's
constants (`wrong_args`), code that does not run (`exec_error`), a teacher mistake pattern
(`renamed_fn`: `def f_impl(`; `wrong_key`: the first metric's key upper-cased; `no_reproduce`:
a solution run but no reproduce.sh written), no solution written -- and prints the reward
histogram and class rates per directory. A run with the wrong parameters scores at most 0.5,
one without a working reproduce.sh 0.33. JAX-free.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from klong_jax.data import schema, shards
from klong_jax.data.chat import message_text
from klong_jax.tasks.families import Family, literal_call, solution_call

_CALL = re.compile(r"json\.dump\((\w+)\((.*?)\), open\(")
_WRITES_REPRODUCE = re.compile(r">\s*reproduce\.sh")
_EXEC_ERROR = re.compile(r"Traceback|SyntaxError|Error:|\[exit code [1-9]")


def _calls_and_outputs(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
  """(text of every tool-call argument the agent sent, text of every tool result)."""
  sent, seen = [], []
  for m in messages:
    if m.get("role") == "assistant":
      for c in m.get("tool_calls") or []:
        args = c.get("function", {}).get("arguments", "")
        try:
          args = " ".join(str(v) for v in json.loads(args).values())
        except (ValueError, AttributeError):
          pass
        sent.append(args)
    elif m.get("role") == "tool":
      seen.append(message_text(m.get("content")))
  return "\n".join(sent), "\n".join(seen)


# Sweep failure modes (tasks/long_suite.py): the harness prints `run K: ...` per logged run and
# the usage line after a malformed command.
SWEEP_TAGS = ("time_limit", "step_limit", "bad_command", "skipped_run", "repeated_run",
              "incomplete_sweep", "no_reproduce")
_RUN_CMD = re.compile(r"python3? run\.py ?([^\s'\"\\;&|)]*)")
_RUN_OUT = re.compile(r"^run (\d+): ", re.MULTILINE)
_USAGE = re.compile(r"^usage: python3 run\.py", re.MULTILINE)


def _sweep_size(messages: Sequence[Mapping[str, Any]]) -> int | None:
  from klong_jax.factory.sweep_teacher import find_sweep  # noqa: PLC0415 - sweeps only

  hit = find_sweep(list(messages))
  return None if hit is None else hit[1]


def classify_sweep(traj: schema.Trajectory) -> dict[str, Any] | None:
  """Failure tags of one long-horizon sweep rollout (None if its paper is not a sweep).

  `time_limit` / `step_limit`: ended by the time limit / the step or token budget (status);
  `bad_command`: a harness command printed the usage line or crashed; `skipped_run`: a setting
  below the highest one run was never logged; `repeated_run`: a setting run twice;
  `incomplete_sweep`: fewer than N distinct settings logged; `no_reproduce`: no reproduce.sh
  written. A rollout with no tag did the whole sweep and wrote reproduce.sh.
  """
  n = _sweep_size(traj.messages)
  if n is None:
    return None
  sent, seen = _calls_and_outputs(traj.messages)
  logged = [int(k) for k in _RUN_OUT.findall(seen)]
  done = set(logged)
  tags = []
  if traj.status in ("agent_timeout", "wall_timeout"):
    tags.append("time_limit")
  elif traj.status == "step_limit":
    tags.append("step_limit")
  bad_args = [a for a in _RUN_CMD.findall(sent) if not (a.isdigit() or a == "table")]
  if bad_args or _USAGE.search(seen) or "Traceback" in seen:
    tags.append("bad_command")
  if done and any(k not in done for k in range(1, max(done))):
    tags.append("skipped_run")
  if len(logged) > len(done):
    tags.append("repeated_run")
  if len(done) < n:
    tags.append("incomplete_sweep")
  if not _WRITES_REPRODUCE.search(sent):
    tags.append("no_reproduce")
  return {"task": traj.task_id, "reward": traj.reward, "status": traj.status, "tags": tags,
          "runs_logged": len(done), "runs": n}


def classify(traj: schema.Trajectory, task: tuple[Family, Mapping[str, Any]] | None
             ) -> dict[str, Any]:
  """Failure tags of one rollout; `task` is its (family, parameters), None for an unknown task.
  A long-horizon sweep rollout gets the sweep tags (`classify_sweep`)."""
  sweep = classify_sweep(traj) if task is None else None
  if sweep is not None:
    return {**sweep, "calls": []}
  sent, seen = _calls_and_outputs(traj.messages)
  calls = [f"{fn}({args})" for fn, args in _CALL.findall(sent)]
  tags = []
  if not calls:
    tags.append("no_solution_call")
  elif task is not None and not {solution_call(task[0]), literal_call(*task)} & set(calls):
    tags.append("wrong_args")
  if re.search(r"def \w+_impl\(", sent):
    tags.append("renamed_fn")
  if task is not None and f"'{task[0].metrics[0].upper()}':" in sent:
    tags.append("wrong_key")
  if calls and not _WRITES_REPRODUCE.search(sent):
    tags.append("no_reproduce")
  if _EXEC_ERROR.search(seen):
    tags.append("exec_error")
  return {"task": traj.task_id, "reward": traj.reward, "status": traj.status, "tags": tags,
          "calls": calls}


@functools.lru_cache(maxsize=1)
def _bundled_tasks() -> dict[str, tuple[Family, Mapping[str, Any]]]:
  from klong_jax.tasks.build_suite import task_ids  # noqa: PLC0415 - generator, read once

  return {tid: (f, p) for f, p, tid, _ in task_ids()}


def bundled_task(task_id: str) -> tuple[Family, Mapping[str, Any]] | None:
  """(family, parameters) of a bundled task id (`arith-3`, `fib-rl2`, `gd-t1`), else None."""
  return _bundled_tasks().get(task_id)


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean reward, reward histogram (2 decimals), tag rates and the mean reward of each tag."""
  rows = list(rows)
  n = len(rows)
  rewards = [r["reward"] or 0.0 for r in rows]
  tags = collections.Counter(t for r in rows for t in r["tags"])
  clean = [r["reward"] or 0.0 for r in rows if not r["tags"]]
  return {
      "n": n,
      "mean_reward": sum(rewards) / n if n else None,
      "histogram": dict(sorted(collections.Counter(round(x, 2) for x in rewards).items())),
      "tag_rate": {t: c / n for t, c in sorted(tags.items())},
      "tag_mean_reward": {t: sum(r["reward"] or 0.0 for r in rows if t in r["tags"]) / c
                          for t, c in sorted(tags.items())},
      "clean_rate": len(clean) / n if n else None,
      "clean_mean_reward": sum(clean) / len(clean) if clean else None,
  }


def diagnose_dir(path: str) -> dict[str, Any]:
  """Classifies every trajectory under `path` (shards found recursively)."""
  rows = []
  for shard in shards.list_shards(path):
    for raw in shards.read_shard(shard):
      t = schema.from_bytes(raw)
      rows.append(classify(t, bundled_task(t.task_id)))
  return {"path": path, **summarize(rows), "rollouts": rows}


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit("usage: python -m klong_jax.eval.diagnose STREAM_DIR [STREAM_DIR ...]")
  for path in argv[1:]:
    d = diagnose_dir(path)
    if not d["n"]:
      print(f"{path}: no trajectories (expected *.array_record shards under it)")
      continue
    print(f"{path}: {d['n']} rollouts, mean reward {d['mean_reward']:.3f}")
    print("  reward histogram: " + ", ".join(f"{k:.2f}x{v}" for k, v in d["histogram"].items()))
    for t, rate in d["tag_rate"].items():
      print(f"  {t:17s} {rate:6.1%}  mean reward {d['tag_mean_reward'][t]:.3f}")
    cm = d["clean_mean_reward"]
    print(f"  {'no failure tag':17s} {d['clean_rate']:6.1%}  mean reward "
          f"{'-' if cm is None else f'{cm:.3f}'}")


if __name__ == "__main__":
  main(sys.argv)

"""The long-horizon mini-paper suite (klong_jax/tasks/data_long/): sweeps of many short actions.

Each task is a `Family` method run over N settings (N drawn per task in [MIN_RUNS, MAX_RUNS]: a
table of experiments released with the paper as `runs.json`, beside the harness `run.py` and the
method's code `solution.py`, all starter files). The agent runs the settings one tool call each
(`python3 run.py K` logs `results/run_K.json` and prints the progress `k/N runs done`; a bad
argument prints the usage, which the agent must recover from), then writes `reproduce.sh` that
rebuilds `results/table.json` from the logged runs, and submits. Every action is one short line,
so a tiny model can learn each; what it must learn is the long horizon: which setting comes next
and when the sweep is complete are read from the latest outputs in its context window, long after
the start of the episode left it. A teacher trajectory is ~30 turns, several demo contexts long,
and each rubric leaf is one sub-goal (each logged run, the reproduced table), so a rollout cut by
a time limit is graded as it stands.

Earlier version (measured, seed 0): the agent also wrote the ~100-token method itself, once per
episode; with 3 examples per family the tiny student never learned it (held-out 0.100 after
split-SFT, every rollout step-limited with garbled code), which hid every other skill.

  python -m klong_jax.tasks.long_suite [--out=DIR]   # deterministic; a test checks the data
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

from klong_jax.tasks.build_suite import leaf, node, write_task_dir
from klong_jax.tasks.families import (
  FAMILIES,
  SOLUTION_FILE,
  Family,
  fresh_params,
  reference_metrics,
)

RUNS_FILE = "runs.json"
HARNESS_FILE = "run.py"
TABLE_FILE = "results/table.json"
MIN_RUNS, MAX_RUNS = 18, 26  # Settings per task (drawn): N runs + reproduce + submit actions.
TRAIN_PER_FAMILY = 3
RL_PER_FAMILY = 2
HELDOUT_PER_FAMILY = 1
BLACKLIST_HOST = "https://github.com/klong-long-papers"


def suite_dir() -> str:
  """The bundled long-horizon suite."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_long")


def run_file(k: int) -> str:
  return f"results/run_{k}.json"


def harness(family: Family) -> str:
  """`run.py`, the experiment harness released with the paper (a starter file)."""
  return (
      '"""Experiment harness: python3 run.py K runs setting K of runs.json; '
      'python3 run.py table."""\n'
      "import json, os, sys\n\nimport solution\n\n"
      f"runs = json.load(open('{RUNS_FILE}'))\nos.makedirs('results', exist_ok=True)\n"
      "done = sorted(f for f in os.listdir('results') if f.startswith('run_'))\n"
      "arg = sys.argv[1] if len(sys.argv) > 1 else ''\n"
      "if arg == 'table':\n"
      "  rows = {f[4:-5]: json.load(open('results/' + f)) for f in done}\n"
      f"  json.dump(rows, open('{TABLE_FILE}', 'w'), indent=1)\n"
      "  print(f'table: {len(rows)}/{len(runs)} runs')\n"
      "elif arg.isdigit() and 1 <= int(arg) <= len(runs):\n"
      "  k = int(arg)\n"
      f"  m = solution.{family.fn}(**runs[k - 1])\n"
      "  json.dump(m, open(f'results/run_{k}.json', 'w'))\n"
      "  n = len(set(done) | {f'run_{k}.json'})\n"
      "  print(f'run {k}: {m}')\n"
      "  print(f'{n}/{len(runs)} runs done')\n"
      "else:\n"
      "  print(f'usage: python3 run.py K (K = 1..{len(runs)}) | python3 run.py table')\n"
      "  sys.exit(2)\n")


def method_code(family: Family) -> str:
  """`solution.py`, the method's code released with the paper (a starter file)."""
  return family.code + "\n"


def _paper(family: Family, n: int, tid: str) -> str:
  keys = " and ".join(f"`{m}`" for m in family.metrics)
  return (
      f"# {family.title}: a Sweep\n\n## Method\n\n{family.method}\n\n## Experiments\n\n"
      f"We run the method on {n} settings (Table 1, released as `{RUNS_FILE}`) and report "
      f"{keys} for each.\n\n## Reproduction\n\nThe released `{SOLUTION_FILE}` implements "
      f"`{family.fn}` (it returns a dict with keys {keys}). Run each setting K = 1..{n} with "
      f"`python3 {HARNESS_FILE} K` (one run per command; each logs `results/run_K.json`). "
      f"Then write `reproduce.sh` that runs `python3 {HARNESS_FILE} table`, which rebuilds "
      f"`{TABLE_FILE}` from the logged runs.\n\nTask id: `{tid}`.\n")


def _addendum(family: Family) -> str:
  return (f"# Addendum\n\n- `{RUNS_FILE}`, `{HARNESS_FILE}` and `{SOLUTION_FILE}` are already "
          f"in the submission directory; do not edit them.\n- Metrics are checked to an absolute "
          f"tolerance of {family.atol:g}.\n- Standard-library Python only.\n")


def build_rubric(family: Family, runs: list[dict[str, Any]], tid: str) -> dict:
  """One leaf per logged run (4 in all), reproduced table (2): partial credit as it stands."""
  m1 = family.metrics[0]
  run_leaves = [
      leaf(f"{tid}/runs/{k}", f"Run {k} is logged with the paper's `{m1}`.", 1,
            "Code Execution", {"type": "numeric", "file": run_file(k), "key": m1,
                               "expected": reference_metrics(family, p)[m1],
                               "atol": family.atol})
      for k, p in enumerate(runs, start=1)]
  return node(f"{tid}/root", f"The sweep of '{family.title}' has been reproduced.", 1, [
      node(f"{tid}/runs", "Every setting of Table 1 was run.", 4, run_leaves),
      node(f"{tid}/table", "reproduce.sh rebuilds the table.", 2, [
          leaf(f"{tid}/table/script", f"reproduce.sh runs `{HARNESS_FILE} table`.", 1,
                "Code Development", {"type": "regex", "file": "reproduce.sh",
                                     "pattern": rf"python3? {HARNESS_FILE} table"}),
          leaf(f"{tid}/table/ok", "reproduce.sh exits successfully.", 1, "Code Execution",
                {"type": "reproduce_ok"}),
          leaf(f"{tid}/table/file", f"Running reproduce.sh writes {TABLE_FILE}.", 2,
                "Result Analysis", {"type": "file_exists", "path": TABLE_FILE, "fresh": True}),
      ]),
  ])


def task_specs() -> list[tuple[Family, list[dict[str, Any]], str, str]]:
  """(family, runs, task id, split) of every long-horizon task (deterministic)."""
  out = []
  per = TRAIN_PER_FAMILY + RL_PER_FAMILY + HELDOUT_PER_FAMILY
  for f in FAMILIES:
    rng = random.Random(f"long:{f.name}")
    sizes = [rng.randint(MIN_RUNS, MAX_RUNS) for _ in range(per)]
    pool = list(f.params) + fresh_params(f, sum(sizes), seed=7)
    rng.shuffle(pool)
    splits = (["train"] * TRAIN_PER_FAMILY + ["rl"] * RL_PER_FAMILY
              + ["heldout"] * HELDOUT_PER_FAMILY)
    start = 0
    for i, (split, n) in enumerate(zip(splits, sizes, strict=True)):
      out.append((f, pool[start:start + n], f"{f.name}-sweep{i + 1}", split))
      start += n
  return out


def build(out_dir: str) -> list[str]:
  """Writes every task dir under `out_dir` (replacing old ones); returns the task ids."""
  os.makedirs(out_dir, exist_ok=True)
  ids = []
  for family, runs, tid, split in task_specs():
    cfg = {"id": tid, "title": f"{family.title}: a Sweep", "split": split,
           "family": family.name, "kind": "sweep", "runs": len(runs), "reproduce_timeout_s": 60}
    write_task_dir(os.path.join(out_dir, tid), build_rubric(family, runs, tid), cfg,
                   _paper(family, len(runs), tid), _addendum(family),
                   {RUNS_FILE: json.dumps(runs) + "\n", HARNESS_FILE: harness(family),
                    SOLUTION_FILE: method_code(family)},
                   f"{BLACKLIST_HOST}/{tid}")
    ids.append(tid)
  return ids


def main(argv: list[str]) -> None:
  out = suite_dir()
  for a in argv[1:]:
    if a.startswith("--out="):
      out = a.split("=", 1)[1]
  print(f"wrote {len(build(out))} long-horizon tasks to {out}")


if __name__ == "__main__":
  main(sys.argv)

"""Generates the bundled mini-paper suite (klong_jax/tasks/data/) from `families.FAMILIES`.

Run `python -m klong_jax.tasks.build_suite [--out=DIR]`; the output is deterministic, and a test
checks the checked-in data equals a fresh build. Per family, the last parameter set is held out,
the others plus `TRAIN_SETS` freshly drawn ones are the `train` split (teacher distillation for
SFT), and `RL_SETS` other fresh sets form the `rl` split: RL tasks the SFT data never showed.
Every task ships its parameters as the starter file `submission/params.json` (a task's `files/`
dir), which the solution loads, so the results leaves reward code that runs correctly rather
than retyping constants (which the tiny model never learned).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import yaml

from klong_jax.fileio import atomic_write_text
from klong_jax.grading.rubric import rubric_from_dict
from klong_jax.tasks.families import (
    FAMILIES,
    METRICS_FILE,
    PARAMS_FILE,
    RL_SETS,
    SOLUTION_FILE,
    TRAIN_SETS,
    Family,
    fresh_params,
    reference_metrics,
    solution_call,
)

BLACKLIST_HOST = "https://github.com/klong-mini-papers"


def _paper(family: Family, params: dict, tid: str) -> str:
  plist = "\n".join(f"- `{k}` = {v!r}" for k, v in params.items())
  keys = " and ".join(f"`{m}`" for m in family.metrics)
  return (
      f"# {family.title}\n\n## Abstract\n\nWe revisit a classic small computation and report "
      f"two numbers that characterise it ({keys}).\n\n## Method\n\n{family.method}\n\n"
      f"## Experimental setup\n\nOur experiment uses exactly these parameters (released with "
      f"the paper as `{PARAMS_FILE}`):\n\n{plist}\n\n"
      f"## Reproduction\n\nImplement `{family.fn}({', '.join(params)})` in `{SOLUTION_FILE}`; it "
      f"returns a dict with keys {keys}. Running `{SOLUTION_FILE}` calls it with the parameters "
      f"above and writes the dict as JSON to `{METRICS_FILE}`. Provide `reproduce.sh` that runs "
      f"`python3 {SOLUTION_FILE}`.\n\nTask id: `{tid}`.\n")


def _addendum(family: Family) -> str:
  return (f"# Addendum\n\n- `{PARAMS_FILE}` (already in the submission directory) holds exactly "
          f"these parameters; call `{solution_call(family)}`.\n"
          f"- Metrics are plain JSON numbers; they are checked to an absolute tolerance of "
          f"{family.atol:g}.\n- Create the `results/` directory if it does not exist.\n"
          f"- Standard-library Python only; no network access is needed.\n")


def leaf(nid: str, req: str, weight: int, cat: str, check: dict) -> dict:
  return {"id": nid, "requirements": req, "weight": weight, "sub_tasks": [],
          "task_category": cat, "finegrained_task_category": None, "check": check}


def node(nid: str, req: str, weight: int, subs: list) -> dict:
  return {"id": nid, "requirements": req, "weight": weight, "sub_tasks": subs,
          "task_category": None, "finegrained_task_category": None}


def build_rubric(family: Family, params: dict, tid: str) -> dict:
  """Seven programmatic leaves over all three categories with varied weights (partial credit)."""
  expected = reference_metrics(family, params)
  m1, m2 = family.metrics
  cd, ce, ra = "Code Development", "Code Execution", "Result Analysis"
  return node(f"{tid}/root", f"The results of '{family.title}' have been reproduced.", 1, [
      node(f"{tid}/impl", "The method is implemented.", 2, [
          leaf(f"{tid}/impl/file", f"{SOLUTION_FILE} exists.", 1, cd,
                {"type": "file_exists", "path": SOLUTION_FILE}),
          leaf(f"{tid}/impl/fn", f"{SOLUTION_FILE} defines `{family.fn}`.", 2, cd,
                {"type": "regex", "file": SOLUTION_FILE, "pattern": rf"def {family.fn}\("}),
          leaf(f"{tid}/impl/repro", f"reproduce.sh runs {SOLUTION_FILE}.", 1, cd,
                {"type": "regex", "file": "reproduce.sh",
                 "pattern": rf"python3? {SOLUTION_FILE}"}),
      ]),
      node(f"{tid}/exec", "The reproduction runs.", 1, [
          leaf(f"{tid}/exec/ok", "reproduce.sh exits successfully.", 2, ce,
                {"type": "reproduce_ok"}),
          leaf(f"{tid}/exec/metrics", f"Running reproduce.sh writes {METRICS_FILE}.", 1, ce,
                {"type": "file_exists", "path": METRICS_FILE, "fresh": True}),
      ]),
      node(f"{tid}/results", "The reported numbers are reproduced.", 3, [
          leaf(f"{tid}/results/{m1}", f"`{m1}` matches the paper's value.", 2, ra,
                {"type": "numeric", "file": METRICS_FILE, "key": m1,
                 "expected": expected[m1], "atol": family.atol}),
          leaf(f"{tid}/results/{m2}", f"`{m2}` matches the paper's value.", 1, ra,
                {"type": "numeric", "file": METRICS_FILE, "key": m2,
                 "expected": expected[m2], "atol": family.atol}),
      ]),
  ])


def task_ids() -> list[tuple[Family, dict, str, str]]:
  """(family, params, task id, split) of every bundled task."""
  out = []
  for f in FAMILIES:
    for i, p in enumerate(f.params):
      out.append((f, p, f"{f.name}-{i + 1}", "heldout" if i == len(f.params) - 1 else "train"))
    # One draw so the rl sets stay the first RL_SETS whatever TRAIN_SETS is.
    fresh = fresh_params(f, RL_SETS + TRAIN_SETS)
    for i, p in enumerate(fresh[:RL_SETS]):
      out.append((f, p, f"{f.name}-rl{i + 1}", "rl"))
    for i, p in enumerate(fresh[RL_SETS:]):
      out.append((f, p, f"{f.name}-t{i + 1}", "train"))
  return out


def write_task_dir(d: str, rubric: dict, cfg: dict, paper: str, addendum: str,
                   starter: dict[str, str], blacklist: str) -> None:
  """Writes one task dir in PaperBench's layout (replacing an old one); validates the rubric."""
  rubric_from_dict(rubric)  # validate before writing
  if os.path.isdir(d):
    shutil.rmtree(d)
  os.makedirs(d)
  atomic_write_text(os.path.join(d, "paper.md"), paper)
  atomic_write_text(os.path.join(d, "addendum.md"), addendum)
  for name, text in starter.items():
    atomic_write_text(os.path.join(d, "files", "submission", name), text)
  atomic_write_text(os.path.join(d, "blacklist.txt"), blacklist + "\n")
  atomic_write_text(os.path.join(d, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
  atomic_write_text(os.path.join(d, "rubric.json"), json.dumps(rubric, indent=2) + "\n")


def build(out_dir: str) -> list[str]:
  """Writes every task dir under `out_dir` (replacing old ones); returns the task ids."""
  os.makedirs(out_dir, exist_ok=True)
  ids = []
  for family, params, tid, split in task_ids():
    cfg = {"id": tid, "title": family.title, "split": split, "family": family.name,
           "reproduce_timeout_s": 60}
    write_task_dir(os.path.join(out_dir, tid), build_rubric(family, params, tid), cfg,
                   _paper(family, params, tid), _addendum(family),
                   {PARAMS_FILE: json.dumps(params) + "\n"}, f"{BLACKLIST_HOST}/{tid}")
    ids.append(tid)
  return ids


def main(argv: list[str]) -> None:
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
  for a in argv[1:]:
    if a.startswith("--out="):
      out = a.split("=", 1)[1]
  ids = build(out)
  print(f"wrote {len(ids)} tasks to {out}")


if __name__ == "__main__":
  main(sys.argv)

"""The CPU demo's async RL with today's loss vs decoupled PPO at the same publish cadence (#32).

  python -m benchmarks.offpolicy_demo --runs=RUNS --seeds=0,1 [--eval_episodes=40]
  python -m benchmarks.offpolicy_demo --runs=RUNS --seeds=0,1 --report_only

Per seed: `RUNS/s<seed>/base` runs configs/demo.py through the SFT eval (tokenizer, distilled
trajectories, SFT, held-out eval of the SFT policy); its phases are linked into two arms that
then run only the RL phase and its held-out eval, from the same SFT checkpoint:
- `today`: rl.off_policy none, hard cap `max_staleness` 0. The pod config had cap 1 with
  multi-hour rollouts that live through many publishes; the demo's rollouts (15-60 s) live
  through at most one, so cap 0 is where its rollouts meet today's rule the way a pod's do;
- `today_cap1` (`--arms` adds it): rl.off_policy none with the pod's old cap 1 itself;
- `decoupled`: decoupled PPO (proximal policy recomputed by the trainer, truncated importance
  weights) with the hard cap 8.
All publish a version every step (rl_tiny `publish=1`), so rollouts that live through
publishes are what the arms treat differently. The report (benchmarks/results/offpolicy_demo.json
or --out) has, per seed and arm, the stream's dropped_stale, trajectories trained, the staleness
and importance-weight metrics, and the held-out reward of the RL policy; over seeds, the paired
held-out difference decoupled - today (eval/episodes.py: same episode keys in both arms) with
intervals. Without --runs (`make bench`) it writes a "skipped" result: a run takes ~1 h on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks._results import write_json

_RUNS = flags.DEFINE_string("runs", "", "Root of the runs (RUNS/s<seed>/{base,today,decoupled}).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Demo seeds.")
_EPISODES = flags.DEFINE_integer("eval_episodes", 40, "Held-out eval episodes per evaluation.")
_OUT = flags.DEFINE_string("out", "", "Result JSON (default: benchmarks/results/).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the report of finished arms.")
_ARMS = flags.DEFINE_list("arms", ["today", "decoupled"], "Arms to run and report (of ARMS).")
_PARALLEL = flags.DEFINE_bool("parallel_arms", True, "Run a seed's two arms at the same time "
                              "(same machine load for both).")

ARMS = {
    "today": "--config.rl.args.off_policy=none --config.rl.args.staleness=0",
    "today_cap1": "--config.rl.args.off_policy=none --config.rl.args.staleness=1",
    "decoupled": "--config.rl.args.off_policy=decoupled --config.rl.args.staleness=8",
}
SHARED = ("tokenizer", "distill", "sft", "eval_sft")
METRICS = ("stream/dropped_stale", "stream/trajectories_used", "stream/time_limited",
           "stale/max", "stale/mean", "is/weight_mean", "is/weight_max", "is/truncated_frac",
           "lag")


def _demo(workdir: str, seed: str, stop_after: str, extra: str, log: str) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "klong_jax.demo", f"--workdir={workdir}",
         f"--config=configs/demo.py:seed={seed}", f"--config.stop_after={stop_after}",
         f"--config.eval.episodes={_EPISODES.value}", *extra.split()]
  print("$ " + " ".join(cmd), flush=True)
  return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def _wait(procs: dict[str, subprocess.Popen]) -> None:
  for name, p in procs.items():
    if p.wait() != 0:
      raise RuntimeError(f"{name} failed (exit {p.returncode}); see its log")


def run_seed(root: str, seed: str, arms: Sequence[str]) -> None:
  """Base through eval_sft, then both arms' RL + held-out eval (finished phases are skipped)."""
  base = os.path.join(root, "base")
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  _wait({"base": _demo(base, seed, "eval_sft", "", os.path.join(root, "base.log"))})
  print(f"seed {seed}: base done in {time.time() - t0:.0f}s", flush=True)
  procs = {}
  for arm in arms:
    extra, wd = ARMS[arm], os.path.join(root, arm)
    os.makedirs(wd, exist_ok=True)
    for d in SHARED:  # the same tokenizer, data, SFT checkpoint and SFT eval
      if not os.path.lexists(os.path.join(wd, d)):
        os.symlink(os.path.join(base, d), os.path.join(wd, d))
    procs[arm] = _demo(wd, seed, "eval_rl", extra, os.path.join(root, f"{arm}.log"))
    if not _PARALLEL.value:
      _wait({arm: procs.pop(arm)})
  _wait(procs)
  print(f"seed {seed}: arms done in {time.time() - t0:.0f}s", flush=True)


def _rl_rows(wd: str) -> list[dict[str, Any]]:
  path = os.path.join(wd, "rl", "metrics.jsonl")
  rows = [json.loads(x) for x in open(path, encoding="utf-8")] if os.path.exists(path) else []
  by_step = {r["step"]: r for r in rows if "policy_version" in r}
  return [by_step[s] for s in sorted(by_step)]


def arm_summary(wd: str) -> dict[str, Any]:
  """One arm's RL stream counters and the per-step staleness / weight metrics."""
  rows = _rl_rows(wd)
  last = rows[-1] if rows else {}
  out: dict[str, Any] = {"steps": len(rows)}
  for k in METRICS:
    vals = [float(r[k]) for r in rows if k in r]
    if not vals:
      continue
    cumulative = k.startswith("stream/")
    out[k] = float(last[k]) if cumulative else {"mean": sum(vals) / len(vals), "max": max(vals)}
  summary = os.path.join(wd, "summary.json")
  if os.path.exists(summary):
    s = json.load(open(summary, encoding="utf-8"))
    out["heldout_rl"], out["heldout_sft"] = s.get("heldout_rl"), s.get("heldout_sft")
    out["rl_s"] = s.get("phases_s", {}).get("rl")
  return out


def report(runs: str, seeds: Sequence[str], arms: Sequence[str]) -> dict[str, Any]:
  from klong_jax.demo import pipeline
  from klong_jax.eval import episodes as ep_lib

  per_seed: dict[str, Any] = {}
  eps: dict[str, list[Any]] = {arm: [] for arm in arms}
  for seed in seeds:
    root = os.path.join(runs, f"s{seed}")
    per_seed[seed] = {arm: arm_summary(os.path.join(root, arm)) for arm in arms
                      if os.path.isdir(os.path.join(root, arm))}
    for arm in arms:
      d = pipeline.eval_dir(os.path.join(root, arm, "eval_rl"), "heldout")
      if os.path.exists(os.path.join(d, "done")):
        eps[arm].extend(ep_lib.read_episodes(os.path.join(d, "stream"), int(seed)))
  res: dict[str, Any] = {"arms": {a: ARMS[a] for a in arms}, "seeds": list(seeds),
                         "per_seed": per_seed}
  eps = {a: v for a, v in eps.items() if v}
  if len(eps) > 1 and "today" in eps:
    rep = ep_lib.report(eps, baseline="today")
    res["heldout"] = rep
    res["heldout_markdown"] = ep_lib.markdown(rep, title="held-out, RL policy")
  return res


def main(argv: list[str]) -> None:
  del argv
  out = _OUT.value or os.path.join("benchmarks", "results", "offpolicy_demo.json")
  if not _RUNS.value:
    if _OUT.value:  # `make bench` (run_all passes only --out): a run takes about an hour.
      write_json(out, {"status": "skipped", "reason": "needs --runs (about 1 h per seed on 2 "
                       "cores); see the module docstring"})
      return
    raise app.UsageError("--runs is required")
  runs = os.path.abspath(_RUNS.value)
  bad = [a for a in _ARMS.value if a not in ARMS]
  if bad:
    raise app.UsageError(f"unknown arms {bad}; choose from {sorted(ARMS)}")
  if not _REPORT_ONLY.value:
    for seed in _SEEDS.value:
      run_seed(os.path.join(runs, f"s{seed}"), seed, _ARMS.value)
  res = report(runs, _SEEDS.value, _ARMS.value)
  write_json(out, res)
  for seed, arms in res["per_seed"].items():
    for arm, s in arms.items():
      print(f"seed {seed} {arm}: dropped_stale {s.get('stream/dropped_stale')} trained "
            f"{s.get('stream/trajectories_used')} held-out {s.get('heldout_rl')}")
  if "heldout_markdown" in res:
    print(res["heldout_markdown"])


if __name__ == "__main__":
  app.run(main)

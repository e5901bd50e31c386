"""The demo's progressive RL on an idle box vs beside N busy processes: per-stage cut shares and
token identity of the groups both runs sampled at one policy version.

  # once: a demo workdir through SFT
  python -m klong_jax.demo --workdir=BASE --config.stop_after=sft
  python -m benchmarks.budget_clock_load --base=BASE --run=RUN_IDLE --busy=0
  python -m benchmarks.budget_clock_load --base=BASE --run=RUN_LOAD --busy=4
  python -m benchmarks.budget_clock_load --compare=RUN_IDLE,RUN_LOAD

Each run starts the RL phase of configs/demo.py (trainer + server + workers, `--rl_args`
overriding its arg string, `--clock` its workers.budget_clock) from BASE's SFT checkpoint, with
`--busy` CPU-bound processes beside it, and writes RUN/budget_clock_load.json: wall time, the
per-stage endings (rewards.endings_by_stage), and per trajectory its group, member, stage,
status, steps, both clocks, policy versions and a digest of its tokens. `--compare` writes
benchmarks/results/budget_clock_load.json (or --out): the two runs' cut shares side by side and
how many trajectories both runs sampled at one policy version are token-identical. Without
--base or --compare (`make bench`) it writes a "skipped" result: a run needs a demo workdir.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from benchmarks._results import write_json

_BASE = flags.DEFINE_string("base", "", "Demo workdir with the tokenizer, tasks and SFT done.")
_RUN = flags.DEFINE_string("run", "", "This run's RL workdir.")
_OUT = flags.DEFINE_string("out", "", "Result JSON of --compare (default benchmarks/results/).")
_BUSY = flags.DEFINE_integer("busy", 0, "CPU-bound processes to run beside the RL phase.")
_CLOCK = flags.DEFINE_string("clock", "", "workers.budget_clock ('' = the demo config's).")
_RL_ARGS = flags.DEFINE_string("rl_args", "", "Overrides of the demo's rl.args, k=v,...")
_COMPARE = flags.DEFINE_string("compare", "", "RUN_A,RUN_B: compare two finished runs.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only (re)write --out's result from its stream "
                             "(a run stopped early: wall_s is then null).")
RESULT = "budget_clock_load.json"


def _record(t: Any) -> dict[str, Any]:
  pv = t.policy_version[t.policy_version >= 0]
  member = int(t.id.rsplit("-", 1)[1])
  return {"group": t.group_id, "member": member, "stage": int(t.stage), "status": t.status,
          "steps": t.metadata.get("steps"), "reward": t.reward,
          "budget_s": t.timings.get("budget_s"), "agent_s": t.timings.get("agent_s"),
          "token_clock_s": t.timings.get("token_clock_s"),
          "versions": sorted({int(v) for v in pv}),
          "tokens_sha": hashlib.sha256(t.tokens.tobytes()).hexdigest()[:16]}


def demo_config() -> Any:
  """configs/demo.py with --rl_args and --clock applied."""
  from configs import demo
  from klong_jax import config_util
  c = demo.get_config("")
  if _RL_ARGS.value:
    for k, v in config_util.parse_items(_RL_ARGS.value):
      c.rl.args[k] = config_util.parse_value(v, c.rl.args.get(k), k)
  if _CLOCK.value:  # The workers' clock and the one the trainer's stage limits name.
    c.workers.budget_clock = _CLOCK.value
    c.rl.overrides.curriculum = {"budget_clock": _CLOCK.value}
  return c


def run_once() -> dict[str, Any]:
  from klong_jax.launch import experiment as xp
  from klong_jax.tasks import long_suite

  c = demo_config()
  base, out = os.path.abspath(_BASE.value), os.path.abspath(_RUN.value)
  os.environ["XLA_FLAGS"] = c.xla_flags
  tok = glob.glob(os.path.join(base, "tokenizer", "*", "tokenizer.model"))[0]
  tasks = xp.link_rl_tasks(c, c.tasks.root or long_suite.suite_dir(), out)
  exp = xp.rl_experiment(c, out, init_checkpoint=os.path.join(base, "sft", "checkpoints"),
                         tokenizer=tok, tasks=tasks)
  busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(_BUSY.value)]
  t0 = time.time()
  try:
    xp.run_local(exp, timeout_s=c.rl.timeout_s, printer=lambda s: print("  " + s, flush=True))
  finally:
    for p in busy:
      p.kill()
      p.wait()
  return collect(out, c, time.time() - t0)


def collect(out: str, c: Any, wall: float | None) -> dict[str, Any]:
  """The run's result from its stream, written to OUT/budget_clock_load.json."""
  from klong_jax.demo import rewards
  stream = os.path.join(out, "stream")
  res = {"busy": _BUSY.value, "clock": c.workers.budget_clock, "rl_args": c.rl.args.to_dict(),
         "wall_s": wall, "endings": rewards.endings_by_stage(stream),
         "trajectories": sorted((_record(t) for t in rewards.iter_trajectories(stream)),
                                key=lambda r: (r["group"], r["member"]))}
  write_json(os.path.join(out, RESULT), res)
  return res


def compare(a_dir: str, b_dir: str) -> dict[str, Any]:
  runs = []
  for d in (a_dir, b_dir):
    with open(os.path.join(d, RESULT), encoding="utf-8") as f:
      runs.append(json.load(f))
  a, b = ({(r["group"], r["member"]): r for r in run["trajectories"]} for run in runs)
  both = [k for k in sorted(a) if k in b and a[k]["versions"] == b[k]["versions"]]
  same = [k for k in both if a[k]["tokens_sha"] == b[k]["tokens_sha"]]
  same_status = [k for k in both if a[k]["status"] == b[k]["status"]]
  res = {"runs": [{k: r[k] for k in ("busy", "clock", "rl_args", "wall_s", "endings")}
                  for r in runs],
         "shared_at_same_versions": len(both), "token_identical": len(same),
         "same_status": len(same_status),
         "differing": [{"key": list(k), "a": a[k], "b": b[k]} for k in both if k not in same]}
  write_json(_OUT.value or os.path.join("benchmarks", "results", RESULT), res)
  return res


def main(argv: list[str]) -> None:
  del argv
  if _COMPARE.value:
    res = compare(*_COMPARE.value.split(","))
    for r in res["runs"]:
      wall = "stopped early" if r["wall_s"] is None else f"{r['wall_s']:.0f}s"
      print(f"busy={r['busy']} clock={r['clock']} wall {wall}: " + "; ".join(
          f"stage {s}: {v['time_limit_share']:.0%} of {v['n']} cut"
          for s, v in r["endings"].items()))
    print(f"{res['token_identical']} / {res['shared_at_same_versions']} trajectories sampled at "
          f"the same policy versions in both runs are token-identical")
    return
  if _COLLECT.value:
    res = collect(os.path.abspath(_RUN.value), demo_config(), None)
    print(json.dumps({"endings": res["endings"]}, indent=1))
    return
  if not (_BASE.value and _RUN.value):
    if _OUT.value:  # `make bench` (run_all passes only --out): this needs a demo workdir.
      write_json(_OUT.value, {"status": "skipped", "reason": "needs --base (a demo workdir "
                              "through SFT) and --run; see the module docstring"})
      return
    raise app.UsageError("--base and --run are required (or --compare=A,B)")
  res = run_once()
  print(json.dumps({"wall_s": res["wall_s"], "endings": res["endings"]}, indent=1))


if __name__ == "__main__":
  app.run(main)

"""Async vs sync RL loop: trajectories/hour and trainer utilisation, in one run.

  python -m benchmarks.rl_loop [--steps=12 --gen_s=auto --workers=2]

The trainer is the real one (`klong_jax.rl.train.run`: Grain stream source, jitted PPO step,
policy publishing, control.json). The fleet is simulated by threads that behave like
`rollout/worker.py` against a hot-reloading server: each group "takes" `gen_s` seconds, is stamped
with the newest published policy version, honours the sync gate (policy_min_version, one group per
version per worker) and is published as an atomic shard. This isolates the loop mechanics from
docker and sampler speed. The bound: with generation time G per step and train time T,
sync takes G + T per step and async max(G, T), so async/sync <= (G + T) / max(G, T) <= 2, the best
case when G == T (`--gen_s` near the step time). Results -> benchmarks/results/rl_loop.json.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time

from absl import app, flags

from klong_jax.inference import reload
from klong_jax.rollout.stream import read_control
from tests.rl.fakes import write_group

_STEPS = flags.DEFINE_integer("steps", 16, "Train steps per mode.")
_GEN = flags.DEFINE_float("gen_s", 3.0, "Seconds per simulated group (rollout time).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Simulated rollout workers.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/rl_loop.json", "Result JSON.")


def fleet(stream: str, policy: str, workers: int, gen_s: float, stop: threading.Event) -> None:
  """Starts `workers` simulated rollout threads writing group shards into `stream`."""
  def work(w: int) -> None:
    seq, last = 0, -1
    while not (os.path.exists(os.path.join(stream, "control.json")) and os.path.isdir(
        os.path.join(policy, "0"))):  # workers start once the trainer has set up the stream
      if stop.wait(0.1):
        return
    while not stop.is_set():
      ctl = read_control(stream)
      served = reload.latest_version(policy)
      served = -1 if served is None else served
      if ctl.policy_min_version >= 0 and served < max(ctl.policy_min_version, last + 1):
        time.sleep(0.05)
        continue
      last = served
      if stop.wait(gen_s):
        return
      write_group(stream, ctl.stage, f"w{w}-{seq:05d}", [1.0, 0.0, 0.5, 0.0], max(served, 0),
                  n=200, seed=1000 * w + seq)
      seq += 1
  for w in range(workers):
    threading.Thread(target=work, args=(w,), daemon=True).start()


def one_mode(mode: str, steps: int, workers: int, gen_s: float, warmup: int = 3) -> dict:
  from configs import rl_tiny
  from klong_jax.rl import train as rl_train
  root = tempfile.mkdtemp(prefix=f"rl_loop_{mode}_")
  stream, work = os.path.join(root, "stream"), os.path.join(root, "run")
  config = rl_tiny.get_config(f"steps={steps},batch=8,row_len=256,groups={workers},publish=1,"
                              f"stage_steps={steps}")
  config.checkpoint.every = steps
  stop = threading.Event()
  fleet(stream, os.path.join(work, "policy"), workers, gen_s, stop)
  try:
    out = rl_train.run(config, work, stream, mode=mode)
  finally:
    stop.set()
  h = out["history"]
  a, b = h[warmup - 1], h[-1]  # steady state: exclude compilation and the startup backlog
  wall = b["wall_s"] - a["wall_s"]
  used = b["stream/trajectories_used"] - a["stream/trajectories_used"]
  train = sum(r["step_s"] for r in h[warmup:])
  gen_total = len(os.listdir(os.path.join(stream, "0"))) * 4 if os.path.isdir(
      os.path.join(stream, "0")) else 0
  return {"mode": mode, "steps": steps, "wall_s": wall, "trajectories_used": used,
          "trajectories_per_hour": used * 3600 / wall, "utilisation": train / wall,
          "median_step_s": statistics.median(r["step_s"] for r in h[warmup:]),
          "measured_steps": len(h) - warmup,
          "dropped_stale": b["stream/dropped_stale"], "trajectories_generated": gen_total,
          "final_version": out["version"]}


def main(argv: list[str]) -> None:
  del argv
  workers, steps = _WORKERS.value, _STEPS.value
  gen_s = _GEN.value
  res = {m: one_mode(m, steps, workers, gen_s) for m in ("sync", "async")}
  speedup = res["async"]["trajectories_per_hour"] / res["sync"]["trajectories_per_hour"]
  t = res["sync"]["median_step_s"]
  result = {"benchmark": "rl_loop", "time": time.time(), "gen_s_per_group": gen_s,
            "workers": workers, **res, "async_over_sync": speedup, "target": 1.5,
            "ideal_bound": (gen_s + t) / max(gen_s, t),
            "bound": "async/sync <= (G+T)/max(G,T) <= 2 with G = generation and T = train time "
                     "per step (the groups of one step are generated in parallel); it is "
                     "largest when G == T; sync also pays the server reload + gate latency",
            "fleet": "simulated threads (real trainer, stream, gating, publishing)"}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  tmp = _OUT.value + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, _OUT.value)
  print(json.dumps({k: v for k, v in result.items() if k not in ("sync", "async")}, indent=2))
  for m in ("sync", "async"):
    print(m, json.dumps(res[m]))


if __name__ == "__main__":
  app.run(main)

"""The token clock calibrated on a real tiny rollout: a demo workdir's SFT policy on its RL tasks,
one episode each, then agent/calibrate.py on the stream.

  # once: a demo workdir through the SFT eval (its eval_sft/policy is the SFT policy)
  python -m klong_jax.demo --workdir=BASE --config.stop_after=eval_sft
  python -m benchmarks.token_clock_calibration --base=BASE --run=RUN [--workers=8] \\
      [--max_steps=40] [--out=benchmarks/results/token_clock_calibration.json]

The rollouts run as the demo's evals do (configs/demo.py: server, `--workers` worker processes,
one episode per claim; the RL workers' temperature and step budget): `--workers=10` (default)
keeps 10 episodes in flight, as the demo's RL does (5 workers x groups of 2). The result holds the
fitted rates (per call, with standard errors), the episode-level fit quality with and without a
cold server's compile stalls, the same for the rates the rollouts ran with, the tool wall/CPU
relation and the box's load average, so a reader can tell a quiet-box calibration from a loaded
one. Without --base (`make bench`) it writes a "skipped" result.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

from absl import app, flags

from benchmarks._results import write_json

_BASE = flags.DEFINE_string("base", "", "Demo workdir through eval_sft (tokenizer, RL tasks, "
                            "eval_sft/policy).")
_RUN = flags.DEFINE_string("run", "", "This run's dir (its eval stream is kept there).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/token_clock_calibration.json",
                           "Result JSON.")
_WORKERS = flags.DEFINE_integer("workers", 10, "Worker processes (episodes in flight).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 40, "Actions per episode.")
_TRIM = flags.DEFINE_float("trim", 0.02, "calibrate --trim.")


def rollout(base: str, run: str) -> dict[str, Any]:
  """One episode per RL task of `base` with its SFT policy, as a demo eval; returns run facts."""
  from configs import demo  # noqa: PLC0415
  from klong_jax.demo import pipeline  # noqa: PLC0415
  toks = sorted(glob.glob(os.path.join(base, "tokenizer", "**", "tokenizer.model"),
                          recursive=True))
  if len(toks) != 1:
    raise FileNotFoundError(f"expected one tokenizer.model under {base}/tokenizer, got {toks}")
  c = demo.get_config("")
  c.eval.episodes, c.eval.episodes_per_task = 0, 1
  c.eval.workers, c.eval.max_steps = _WORKERS.value, _MAX_STEPS.value
  c.eval.temperature = c.workers.temperature
  c.eval.timeout_s = 3600.0
  load0, t0 = os.getloadavg()[0], time.time()
  pipeline._evaluate(c, os.path.join(run, "eval"), os.path.join(base, "eval_sft", "policy"),
                     toks[0], os.path.join(base, "tasks", "rl"))
  return {"wall_s": time.time() - t0, "load_avg_start": load0,
          "load_avg_end": os.getloadavg()[0], "workers": _WORKERS.value,
          "max_steps": _MAX_STEPS.value}


def main(argv: list[str]) -> None:
  del argv
  from klong_jax.agent import calibrate  # noqa: PLC0415
  if not (_BASE.value and _RUN.value):
    write_json(_OUT.value, {"status": "skipped", "reason": "needs --base (a demo workdir "
                            "through eval_sft) and --run; see the module docstring"})
    return
  facts = rollout(os.path.abspath(_BASE.value), os.path.abspath(_RUN.value))
  stream = os.path.join(os.path.abspath(_RUN.value), "eval", "stream")
  eps, n = calibrate.load_episodes(stream)
  fit = calibrate.fit(eps, "auto", trajectories=n, trim=_TRIM.value)
  print(calibrate.report(fit, stream))
  write_json(_OUT.value, calibrate._finite(dict(facts, stream=stream, fit=fit.to_json())))


if __name__ == "__main__":
  app.run(main)

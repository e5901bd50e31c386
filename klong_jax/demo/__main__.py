"""`make demo`: `python -m klong_jax.demo --workdir=runs/demo [--config=configs/demo.py:seed=1]`.

Runs `pipeline.run` (every phase, finished ones skipped) and prints the held-out reward line.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from klong_jax.demo import pipeline
from klong_jax.launch import procs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    res = pipeline.run(_CONFIG.value, _WORKDIR.value)
  except procs.RoleError as e:
    print(f"demo failed: {e}", file=sys.stderr)
    raise SystemExit(1) from None
  if "heldout_rl" in res:
    print(f"held-out mean reward: after SFT {res['heldout_sft']:.3f} -> after RL "
          f"{res['heldout_rl']:.3f}")
  print(f"summary: {os.path.join(_WORKDIR.value, 'summary.json')}")


if __name__ == "__main__":
  app.run(main)

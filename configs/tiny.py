"""Tiny CPU MoE (3 layers, 8 experts top-2, vocab 512): seconds per step on 2 cores.

Usage: python -m klong_jax.<entry> --config=configs/tiny.py --config.model.num_experts=16
(arg: "scan=0,remat=full,dtype=bfloat16" overrides the run-time switches).
"""

from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict with `model` and `mesh` sections for the tiny preset."""
  return common.preset_config("tiny", arg)

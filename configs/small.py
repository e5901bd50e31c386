"""Small CPU MoE (4 layers, hidden 128, 16 experts top-4, vocab 2048).

Usage: python -m klong_jax.<entry> --config=configs/small.py --config.model.num_experts=16
(arg: "scan=0,remat=full,dtype=bfloat16" overrides the run-time switches).
"""

from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict with `model` and `mesh` sections for the small preset."""
  return common.preset_config("small", arg)

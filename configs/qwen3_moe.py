"""Qwen3-30B-A3B (Qwen3MoeForCausalLM shapes): softmax router, QK-norm, no shared expert.

Usage: python -m klong_jax.<entry> --config=configs/qwen3_moe.py --config.model.num_experts=16
(arg: "scan=0,remat=full,dtype=bfloat16" overrides the run-time switches).
"""

from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict with `model` and `mesh` sections for the qwen3_moe preset."""
  return common.preset_config("qwen3_moe", arg, fsdp=-1, expert=8)

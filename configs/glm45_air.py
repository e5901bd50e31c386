"""GLM-4.5-Air (106B total / 12B active), HF Glm4MoeForCausalLM shapes.

Usage: python -m klong_jax.<entry> --config=configs/glm45_air.py --config.model.num_experts=16
(arg: "scan=0,remat=full,dtype=bfloat16,moe_chunk=4096,context=1" overrides the run-time
switches; moe_chunk defaults to 4096 tokens per row and remat to full, the pod configs' values:
docs/performance.md).
"""

from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict with `model` and `mesh` sections for the glm45_air preset."""
  # remat full by default: launch/tpu.py takes model + mesh from this preset, and without it the
  # pod trainer ran with remat none (the TPU plans in docs/performance.md assume full).
  return common.preset_config("glm45_air", arg, moe_chunk=4096, remat="full", fsdp=-1, expert=8)

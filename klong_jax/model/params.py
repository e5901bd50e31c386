"""Parameter counts from abstract shapes (`nnx.eval_shape`): nothing is allocated.

`active` counts the parameters one token touches: everything except the routed experts it is not
sent to (only top_k of num_experts per MoE layer), and without the embedding table and output
head (non-embedding active params). That is GLM-4.5-Air's convention ("106B total / 12B active");
Qwen3 quotes active *with* both vocab tables (30B-A3B: 3.3B), i.e. this count + 2*vocab*hidden.
"""

from __future__ import annotations

import jax
from flax import nnx

from klong_jax.model.config import ModelConfig

ROUTED = ("gate_edf", "up_edf", "down_efd")


def count_params(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active) parameter counts of the model `cfg` describes."""
  from klong_jax.model.transformer import Transformer  # Local: avoid a cycle at import time.

  cfg.validate()
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  total = routed = embed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    size = leaf.size
    total += size
    if names[-1] in ROUTED or (len(names) > 1 and names[-2] in ROUTED):
      routed += size
    if "embed_vd" in names or "lm_head_dv" in names:
      embed += size
  active = total - embed - routed + routed * cfg.num_experts_per_tok // cfg.num_experts
  return total, active

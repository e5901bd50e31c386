"""Model FLOPs per token (matmul FLOPs, the MFU convention) and MFU for the configured model.

Per token, one forward pass costs 2 FLOPs per weight it multiplies (q/k/v/o projections, dense
FFN, router, the top_k routed + shared experts of each MoE layer, the LM head; the embedding
lookup is a gather, 0 FLOPs) plus the attention term 4 * num_heads * head_dim * context (QK^T
and AV), where context is the mean number of keys a query sees: (T+1)/2 for causal attention
counted as useful work (the default), T for what a full masked T x T kernel executes. Training
is 3x the forward (backward = 2x), i.e. the familiar 6 FLOPs per active parameter per token.
Elementwise work (norms, softmax, rope, silu) is excluded, as in the PaLM / MaxText MFU count.
"""

from __future__ import annotations

import dataclasses

from klong_jax.model.config import ModelConfig
from klong_jax.perf import devices


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
  """Forward matmul FLOPs per token, split by part (sum with `.total`)."""

  attn_proj: float  # q, k, v, o projections over all layers.
  attn_scores: float  # QK^T and AV over all layers (the seq-len term).
  dense_ffn: float  # The first_k_dense SwiGLU layers.
  router: float
  routed_experts: float  # experts_per_token routed experts in every MoE layer.
  shared_experts: float
  lm_head: float

  @property
  def total(self) -> float:
    return sum(dataclasses.asdict(self).values())


def forward_breakdown(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                      experts_per_token: float | None = None) -> FlopsBreakdown:
  """Forward FLOPs per token of `cfg` at sequence length `seq_len`.

  `experts_per_token` defaults to top_k (dropless routing, useful work); pass num_experts to
  count what the dense all-experts reference executes, or a measured padded-row ratio.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1 to count attention FLOPs, got {seq_len}")
  d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layers, moe_layers = cfg.num_layers, cfg.num_moe_layers
  context = (seq_len + 1) / 2 if causal else float(seq_len)
  k = cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
  expert_ffn = 2 * 3 * d * cfg.moe_intermediate_size
  return FlopsBreakdown(
      attn_proj=layers * 2 * d * h * (2 * n + 2 * kv),
      attn_scores=layers * 4 * n * h * context,
      dense_ffn=cfg.first_k_dense * 2 * 3 * d * cfg.intermediate_size,
      router=moe_layers * 2 * d * cfg.num_experts,
      routed_experts=moe_layers * k * expert_ffn,
      shared_experts=moe_layers * cfg.num_shared_experts * expert_ffn,
      lm_head=2 * d * cfg.vocab_size,
  )


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
  """Forward (inference / prefill) matmul FLOPs per token: ~2 x active params + attention."""
  return forward_breakdown(cfg, seq_len, causal=causal).total


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
  """Training FLOPs per token: forward + backward = 3 x forward (~6 x active params)."""
  return 3.0 * forward_flops_per_token(cfg, seq_len, causal=causal)


def mfu(tokens_per_s: float, cfg: ModelConfig, device_kind: str, num_devices: int, *,
        seq_len: int, training: bool = True) -> float | None:
  """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' bf16 peak.

  Returns None when `device_kind` has no peak in `tools.devices` (CPU): report
  `achieved_flops` instead.
  """
  peak = devices.peak_flops(device_kind)
  if peak is None:
    return None
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  return achieved_flops(tokens_per_s, cfg, seq_len=seq_len, training=training) / (
      peak * num_devices)


def achieved_flops(tokens_per_s: float, cfg: ModelConfig, *, seq_len: int,
                   training: bool = True) -> float:
  """Model FLOP/s achieved at `tokens_per_s` (all devices together)."""
  per_token = (train_flops_per_token if training else forward_flops_per_token)(cfg, seq_len)
  return tokens_per_s * per_token

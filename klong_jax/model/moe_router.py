"""MoE router as pure functions: scores, biased top-k selection, combine weights, aux losses.

GLM-4.5 scores experts with a sigmoid and adds a learned-outside-the-gradient correction bias
(`e_score_correction_bias`) for *selection only*; the combine weights use the unbiased scores.
Qwen3-MoE uses a softmax and no bias. Both optionally renormalise the top-k weights and scale them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_scores(logits: jax.Array, score: str) -> jax.Array:
  """Per-expert scores in fp32 from router logits [N, E]."""
  logits = logits.astype(jnp.float32)
  if score == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def select_experts(scores: jax.Array, bias: jax.Array | None, top_k: int, norm_topk_prob: bool,
                   scaling: float) -> tuple[jax.Array, jax.Array]:
  """Top-k experts by (scores + bias); returns (indices [N,k] int32, weights [N,k] fp32)."""
  choice = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
  _, idx = jax.lax.top_k(choice, top_k)
  idx = idx.astype(jnp.int32)
  return idx, gate_weights(scores, idx, norm_topk_prob, scaling)


def gate_weights(scores: jax.Array, idx: jax.Array, norm_topk_prob: bool,
                 scaling: float) -> jax.Array:
  """Combine weights [N,k] of the chosen experts `idx` from the unbiased scores (differentiable)."""
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * scaling


def _recorded(replay: jax.Array, num_experts: int) -> jax.Array:
  """[N] rows of `replay` [N,k] that are a full record (every id in [0, E))."""
  return jnp.all((replay >= 0) & (replay < num_experts), axis=-1)


def replay_experts(idx: jax.Array, replay: jax.Array, num_experts: int) -> jax.Array:
  """Routing replay (R3): the recorded ids `replay` [N,k] where a token has a full valid record,
  the router's own choice `idx` elsewhere (rows holding any id outside [0, E), e.g. -1)."""
  replay = replay.astype(jnp.int32)
  return jnp.where(_recorded(replay, num_experts)[:, None], replay, idx)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the leading (token) axis of the rows where mask [N] is True (all rows: None)."""
  if mask is None:
    return jnp.mean(values, axis=0)
  m = mask.astype(values.dtype).reshape(mask.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * m, axis=0) / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def replay_flip_share(own: jax.Array, replay: jax.Array, num_experts: int,
                      mask: jax.Array | None = None) -> jax.Array:
  """Share of (real, `mask`) tokens with a full record whose own top-k set [N,k] differs from the
  recorded set: the selections routing replay overrides (sampler-vs-trainer routing drift)."""
  replay = replay.astype(jnp.int32)
  recorded = _recorded(replay, num_experts)
  if mask is not None:
    recorded = recorded & mask
  differs = jnp.any(jnp.sort(own, axis=-1) != jnp.sort(replay, axis=-1), axis=-1) & recorded
  return differs.sum().astype(jnp.float32) / jnp.maximum(recorded.sum(), 1).astype(jnp.float32)


def expert_load(idx: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of the real (`mask` [N]) tokens' routed slots that went to each expert, [E]."""
  weight = jnp.ones(idx.shape, jnp.float32)
  if mask is not None:
    weight = weight * mask.astype(jnp.float32)[:, None]
  counts = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(weight.reshape(-1))
  return counts / jnp.maximum(jnp.sum(weight), 1.0)


def load_balancing_loss(scores: jax.Array, idx: jax.Array, mask: jax.Array | None = None
                        ) -> jax.Array:
  """Switch-style E * sum_e f_e * P_e over real tokens; P uses per-token-normalised scores.
  1.0 when balanced."""
  num_experts = scores.shape[-1]
  probs = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
  return num_experts * jnp.sum(expert_load(idx, num_experts, mask) * _masked_mean(probs, mask))


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over real tokens of the squared logsumexp of router logits (ST-MoE)."""
  return _masked_mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), mask)


def update_expert_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step (DeepSeek-V3): raise under-loaded experts' bias, lower others."""
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)

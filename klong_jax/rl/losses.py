"""The KLong RL loss on packed rows: PPO clipped surrogate vs the sampler, KL to a reference.

Conventions as in `train/losses.py` (packed [B, L] rows, logits positions via `shift_targets` /
`shift_aligned`). Pure functions; reductions in float32.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]
Normalization = Literal["token", "sequence"]


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (Schulman's k1/k2/k3).

  With d = logp - ref_logp: k1 = d (unbiased, can be negative; its gradient is grad logp, zero
  in expectation), k2 = d^2 / 2 (gradient d * grad logp), k3 = exp(-d) - 1 + d (>= 0, unbiased
  under pi_theta; gradient (1 - exp(-d)) * grad logp). Positive d pushes logp down for k2/k3.
  """
  d = logp - ref_logp
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d * d
  if estimator == "k3":
    return jnp.exp(-d) - 1.0 + d
  raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")


def _normalize(per_token: jax.Array, weights: jax.Array, segment_ids: jax.Array,
               normalization: Normalization) -> jax.Array:
  """Reduces a per-token loss to a scalar: mean over loss tokens, or mean of per-sequence means."""
  if normalization == "token":
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  if normalization == "sequence":
    b, length = segment_ids.shape
    # One bucket per (row, segment id); segment ids are < L + 1 within a row.
    ids = (jnp.arange(b)[:, None] * (length + 1) + segment_ids).reshape(-1)
    n = b * (length + 1)
    seg_sum = jax.ops.segment_sum((per_token * weights).reshape(-1), ids, num_segments=n)
    seg_cnt = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=n)
    has = seg_cnt > 0
    seg_mean = jnp.where(has, seg_sum / jnp.maximum(seg_cnt, 1.0), 0.0)
    return seg_mean.sum() / jnp.maximum(has.sum(), 1)
  raise ValueError(f"unknown loss normalization {normalization!r}; use 'token' or 'sequence'")


def ppo_loss(
    logp: jax.Array,
    behaviour_logp: jax.Array,
    advantages: jax.Array,
    weights: jax.Array,
    segment_ids: jax.Array,
    *,
    ref_logp: jax.Array | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    kl_clamp: float | None = None,
    ratio_cap: float | None = None,
    normalization: Normalization = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token PPO clipped surrogate against the sampler's logprobs, plus a KL penalty (no critic).

  All inputs are on logits positions ([B, L]; use `shift_targets`/`shift_aligned`). Per token:
    r = exp(logp - behaviour_logp);  r_c = min(r, ratio_cap) if ratio_cap else r
    l = -min(r_c * A, clip(r, 1 - clip_low, 1 + clip_high) * A) + kl_coef * KL(logp, ref_logp)
  `ratio_cap` (> 1 + clip_high) bounds the weight of stale tokens whose ratio exploded: for A < 0
  it is dual-clip PPO (loss floor at -ratio_cap * A, zero gradient beyond); for A > 0 the clip
  already bounds it. `kl_clamp` bounds each token's KL estimate to [-kl_clamp, kl_clamp] (verl's
  low_var_kl uses 10): k3 is exp(-d) for a token the policy made far less likely than the
  reference, and one such token (likely an MoE routing flip) can swamp a clipped update.
  Normalisation 'token': sum over loss tokens / number of loss tokens in the batch (long chunks
  weigh more). 'sequence': mean per chunk (segment), then mean over chunks
  (the paper's 1/(n*K) over sub-trajectories; every chunk weighs the same).
  """
  if ratio_cap is not None and ratio_cap <= 1.0 + clip_high:
    raise ValueError(f"ratio_cap ({ratio_cap}) must exceed 1 + clip_high ({1.0 + clip_high}) "
                     "or be None")
  live = weights > 0
  # Masked positions (prompt tokens, pads) carry arbitrary logprobs: zero them before exp.
  log_ratio = jnp.where(live, logp - behaviour_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  capped = jnp.minimum(ratio, ratio_cap) if ratio_cap is not None else ratio
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = jnp.minimum(capped * advantages, clipped * advantages)
  per_token = -surrogate
  metrics: dict[str, jax.Array] = {}
  if kl_coef:
    if ref_logp is None:
      raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference policy)")
    kl = kl_penalty(logp, jnp.where(live, ref_logp, logp), kl_estimator)
    if kl_clamp is not None:
      metrics["kl_max"] = jnp.where(live, kl, 0.0).max()
      kl = jnp.clip(kl, -kl_clamp, kl_clamp)
    per_token = per_token + kl_coef * kl
    metrics["kl"] = (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  loss = _normalize(per_token, weights, segment_ids, normalization)
  denom = jnp.maximum(weights.sum(), 1.0)
  is_clipped = ((advantages > 0) & (ratio > 1.0 + clip_high)) | (
      (advantages < 0) & (ratio < 1.0 - clip_low))
  gap = jnp.abs(log_ratio)  # Sampler-vs-trainer logprob mismatch (+ staleness) per loss token.
  metrics.update({
      "logprob_gap_mean": (gap * weights).sum() / denom,
      "logprob_gap_max": jnp.where(live, gap, 0.0).max(),
      "loss_tokens": weights.sum(),
      "ratio_mean": (ratio * weights).sum() / denom,
      "clip_frac": (is_clipped * weights).sum() / denom,
      "surrogate": (surrogate * weights).sum() / denom,
  })
  if ratio_cap is not None:
    metrics["cap_frac"] = ((ratio > ratio_cap) * weights).sum() / denom
  return loss, metrics

"""The KLong RL loss on packed rows: PPO clipped surrogate, KL to a reference, and the off-policy
correction hours-long rollouts need (decoupled PPO with truncated or masked importance weights).

Conventions as in `train/losses.py` (packed [B, L] rows, logits positions via `shift_targets` /
`shift_aligned`). Pure functions; reductions in float32.

Off-policy correction (AReaL's decoupled PPO; the TIS/MIS of verl and slime): a multi-hour rollout
is sampled by many policy versions (the behaviour policy mu, per token), so the ratio pi/mu mixes
staleness, sampler-vs-trainer mismatch and this step's own minibatch updates, and the PPO clip
absorbs all three. With a proximal policy pi_prox (the trainer's params at the start of the step,
recomputed on the same tokens) the loss clips only pi/pi_prox (how far this step moved) and
weights each token by w = pi_prox/mu, stop-gradient, truncated at `is_cap` ("truncate", TIS) or
zeroed outside [1/is_cap, is_cap] ("mask", MIS); per token, or per chunk ("sequence": the
geometric mean of the chunk's token ratios, so a long chunk's weight does not explode or vanish).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]
Normalization = Literal["token", "sequence"]
ISLevel = Literal["token", "sequence"]
ISMode = Literal["truncate", "mask"]


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


def _segment_sums(x: jax.Array, weights: jax.Array, segment_ids: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(weighted sum of x, loss-token count) per (row, segment) bucket, and each position's bucket.

  Segment ids are < L + 1 within a row, so bucket = row * (L + 1) + segment id."""
  b, length = segment_ids.shape
  ids = (jnp.arange(b)[:, None] * (length + 1) + segment_ids).reshape(-1)
  n = b * (length + 1)
  seg_sum = jax.ops.segment_sum((x * weights).reshape(-1), ids, num_segments=n)
  seg_cnt = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=n)
  return seg_sum, seg_cnt, ids


def _segment_mean(x: jax.Array, weights: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Per-position mean of x over the loss tokens of its (row, segment), broadcast back [B, L]."""
  seg_sum, seg_cnt, ids = _segment_sums(x, weights, segment_ids)
  return (seg_sum / jnp.maximum(seg_cnt, 1.0))[ids].reshape(segment_ids.shape)


def importance_weights(prox_logp: jax.Array, behaviour_logp: jax.Array, weights: jax.Array,
                       segment_ids: jax.Array, *, level: ISLevel = "token",
                       mode: ISMode = "truncate", cap: float = 2.0
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Stop-gradient off-policy weights pi_prox/mu per position [B, L] and their statistics.

  level "token": each token's own ratio; "sequence": the geometric mean over its chunk's loss
  tokens. mode "truncate": min(w, cap) (TIS); "mask": w where 1/cap <= w <= cap, else 0 (MIS).
  Positions without a loss token get weight 0.
  """
  if not cap > 1.0:
    raise ValueError(f"rl.is_cap must be > 1 (it bounds pi_prox/mu), got {cap}")
  live = weights > 0
  log_w = jnp.where(live, prox_logp - behaviour_logp, 0.0)
  if level == "sequence":
    log_w = _segment_mean(log_w, weights, segment_ids)
  elif level != "token":
    raise ValueError(f"unknown rl.is_level {level!r}; use 'token' or 'sequence'")
  raw = jnp.exp(jnp.clip(log_w, -30.0, 30.0))
  if mode == "truncate":
    w, cut = jnp.minimum(raw, cap), raw > cap
  elif mode == "mask":
    cut = (raw > cap) | (raw < 1.0 / cap)
    w = jnp.where(cut, 0.0, raw)
  else:
    raise ValueError(f"unknown rl.is_mode {mode!r}; use 'truncate' or 'mask'")
  w = jax.lax.stop_gradient(jnp.where(live, w, 0.0))
  denom = jnp.maximum(weights.sum(), 1.0)
  metrics = {"is/weight_mean": (w * weights).sum() / denom,
             "is/weight_max": jnp.where(live, w, 0.0).max(),
             "is/raw_max": jnp.where(live, raw, 0.0).max(),
             "is/raw_min": jnp.where(live, raw, jnp.inf).min(),
             f"is/{'truncated' if mode == 'truncate' else 'masked'}_frac":
                 (cut * weights).sum() / denom}
  return w, metrics


def _normalize(per_token: jax.Array, weights: jax.Array, segment_ids: jax.Array,
               normalization: Normalization, denominator: jax.Array | None = None) -> jax.Array:
  """Reduces a per-token loss to a scalar: mean over loss tokens, or mean of per-sequence means.

  `denominator` replaces this batch's own count (loss tokens, or chunks with loss tokens) when
  the batch is one micro-batch of a larger update: the micro-batch losses then sum to the
  update's mean (gradient accumulation, rl/minibatch.py)."""
  if normalization == "token":
    den = weights.sum() if denominator is None else denominator
    return (per_token * weights).sum() / jnp.maximum(den, 1.0)
  if normalization == "sequence":
    seg_sum, seg_cnt, _ = _segment_sums(per_token, weights, segment_ids)
    has = seg_cnt > 0
    seg_mean = jnp.where(has, seg_sum / jnp.maximum(seg_cnt, 1.0), 0.0)
    den = has.sum() if denominator is None else denominator
    return seg_mean.sum() / jnp.maximum(den, 1)
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
    prox_logp: jax.Array | None = None,
    is_level: ISLevel = "token",
    is_mode: ISMode = "truncate",
    is_cap: float = 2.0,
    denominator: jax.Array | None = None,
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
  With `prox_logp` (decoupled PPO, module docstring) r = exp(logp - prox_logp) and the surrogate
  is multiplied by `importance_weights(prox_logp, behaviour_logp, ...)`; `ratio_cap` then bounds
  r against the proximal policy. Without it: today's single ratio against the sampler.
  `denominator`: the whole update's count when this batch is one of its micro-batches
  (`_normalize`).
  """
  if ratio_cap is not None and ratio_cap <= 1.0 + clip_high:
    raise ValueError(f"ratio_cap ({ratio_cap}) must exceed 1 + clip_high ({1.0 + clip_high}) "
                     "or be None")
  live = weights > 0
  metrics: dict[str, jax.Array] = {}
  anchor, is_w = behaviour_logp, None
  if prox_logp is not None:
    anchor = jax.lax.stop_gradient(prox_logp)
    is_w, metrics = importance_weights(anchor, behaviour_logp, weights, segment_ids,
                                       level=is_level, mode=is_mode, cap=is_cap)
  # Masked positions (prompt tokens, pads) carry arbitrary logprobs: zero them before exp.
  log_ratio = jnp.where(live, logp - anchor, 0.0)
  ratio = jnp.exp(log_ratio)
  capped = jnp.minimum(ratio, ratio_cap) if ratio_cap is not None else ratio
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = jnp.minimum(capped * advantages, clipped * advantages)
  if is_w is not None:
    surrogate = is_w * surrogate
  per_token = -surrogate
  if kl_coef:
    if ref_logp is None:
      raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference policy)")
    kl = kl_penalty(logp, jnp.where(live, ref_logp, logp), kl_estimator)
    if kl_clamp is not None:
      metrics["kl_max"] = jnp.where(live, kl, 0.0).max()
      kl = jnp.clip(kl, -kl_clamp, kl_clamp)
    per_token = per_token + kl_coef * kl
    metrics["kl"] = (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  loss = _normalize(per_token, weights, segment_ids, normalization, denominator)
  denom = jnp.maximum(weights.sum(), 1.0)
  is_clipped = ((advantages > 0) & (ratio > 1.0 + clip_high)) | (
      (advantages < 0) & (ratio < 1.0 - clip_low))
  # Sampler-vs-trainer logprob mismatch (+ staleness) per loss token, whatever the ratio's anchor.
  gap = jnp.abs(jnp.where(live, logp - behaviour_logp, 0.0))
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

"""Optimizer construction: AdamW + warmup/cosine + global-norm clipping (+ optional accumulation).

Pure builders from the `optim` config section, so the SFT and RL trainers share one recipe.
Mixed precision keeps fp32 master weights in the train state and the optimizer; the forward pass
runs on a copy cast by the shared compute-dtype policy (`model/precision.py`, see
`cast_for_compute`), so updates never round through bf16 and the sampler computes the same thing.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from klong_jax.model import precision

resolve_dtype = precision.resolve_dtype  # Config dtype name -> jnp dtype (raises on unknown).


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * final_lr_ratio` at `total_steps`.

  Steps count optimizer updates (after gradient accumulation), matching `optax.MultiSteps`.
  """
  if cfg.total_steps <= cfg.warmup_steps:
    raise ValueError(f"optim.total_steps ({cfg.total_steps}) must exceed optim.warmup_steps "
                     f"({cfg.warmup_steps}); raise total_steps or lower warmup_steps")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps, end_value=cfg.lr * cfg.final_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (ndim >= 2): norms' scales and biases are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule), wrapped in `optax.MultiSteps` if `grad_accum > 1`.

  With accumulation, one optimizer update happens every `grad_accum` calls; the gradients of the
  micro-batches are averaged (each micro-batch loss is already normalised per loss token, so this
  is a mean of per-token means, equal to the global per-token mean when micro-batches hold equal
  numbers of loss tokens).
  """
  chain = []
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(
      make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=_decay_mask))
  tx = optax.chain(*chain)
  accum = int(cfg.grad_accum)
  if accum < 1:
    raise ValueError(f"optim.grad_accum must be >= 1, got {accum}")
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx


def cast_for_compute(params: Any, dtype: Any) -> Any:
  """The forward's params under the shared policy (`precision.cast_params`): matmul weights in
  the compute dtype, router / expert bias / norm scales / biases fp32, as the sampler has them.

  Differentiating through the cast returns fp32 gradients for the fp32 masters.
  """
  return precision.cast_params(params, dtype)


def learning_rate(cfg: ml_collections.ConfigDict, step: int) -> float:
  """The scheduled learning rate at optimizer step `step` (for logging)."""
  return float(make_schedule(cfg)(step))

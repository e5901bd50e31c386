"""Grouped-query attention with partial RoPE, optional qkv bias / QK-norm, masks and a KV cache.

Two entry points share the projections: `__call__` (training / full forward: causal by token index
plus segment-id masking for packed rows) and `decode` (writes K/V at slot = positions[b, t] of a
per-layer cache and lets a query at position p see slots <= p of its own row, so rows of a batch
may sit at different lengths and a reused row simply re-prefills from position 0). The attention
itself is `klong_jax.kernels.attention`, backend picked by `cfg.attention_impl`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.kernels import attention as kernels
from klong_jax.kernels.attention import reference
from klong_jax.model.config import ModelConfig
from klong_jax.model.layers import (
  RMSNorm,
  constrain,
  dtype_of,
  logical_spec,
  mesh_axes,
  param,
  rope,
)

# Kept importable here for callers of the old names (benchmarks/_legacy_decode.py).
attend = reference.attend_masked
cache_mask = reference.cache_mask
causal_segment_mask = reference.causal_segment_mask


def _context_to_heads(q: jax.Array, k: jax.Array, v: jax.Array, head_axes: object
                      ) -> tuple[jax.Array, jax.Array, jax.Array, object]:
  """Context parallelism (sequence sharded over the `act_seq` mesh axes): re-shard q/k/v from
  sequence to heads (one all-to-all each, DeepSpeed-Ulysses style) so every device attends over
  whole rows for its heads: causality and segment ids need nothing new. When the kv heads do not
  divide over those axes too, gather the sequence instead (all-gather CP: each device attends
  over whole rows for the heads it already had). Returns (q, k, v, head axes for the kernel)."""
  ctx = mesh_axes("act_seq")
  if not ctx:
    return q, k, v, head_axes
  mesh = jax.sharding.get_abstract_mesh()
  batch = logical_spec(("act_batch",))[0]
  own = () if head_axes is None else (head_axes,) if isinstance(head_axes, str) else head_axes
  axes = tuple(own) + ctx
  size = math.prod(mesh.shape[a] for a in axes)
  if k.shape[2] % size or q.shape[2] % size:
    axes = tuple(own)
  spec = None if not axes else axes[0] if len(axes) == 1 else axes
  heads = jax.sharding.PartitionSpec(batch, None, spec, None)
  q, k, v = (jax.lax.with_sharding_constraint(a, heads) for a in (q, k, v))
  return q, k, v, spec


class Attention(nnx.Module):
  """GQA self-attention; params map 1:1 to HF q/k/v/o_proj (+bias) and q_norm/k_norm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.dtype = dtype_of(cfg.dtype)
    self.q_dnh = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
    self.k_dkh = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.v_dkh = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.o_nhd = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)
    if cfg.qkv_bias:
      self.q_bias_nh = param(rngs, (n, h), ("heads", "head_dim"), cfg, init="zeros")
      self.k_bias_kh = param(rngs, (kv, h), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.v_bias_kh = param(rngs, (kv, h), ("kv_heads", "head_dim"), cfg, init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg, rngs=rngs, name="head_dim")
      self.k_norm = RMSNorm(h, cfg, rngs=rngs, name="head_dim")

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg, dt = self.cfg, self.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q_dnh[...].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", x, self.k_dkh[...].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x, self.v_dkh[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias_nh[...].astype(dt)
      k = k + self.k_bias_kh[...].astype(dt)
      v = v + self.v_bias_kh[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
    k = rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    return q, k, v

  def _out(self, o: jax.Array) -> jax.Array:
    y = jnp.einsum("btnh,nhd->btd", o, self.o_nhd[...].astype(self.dtype))
    return constrain(y, ("act_batch", "act_seq", "act_embed"))

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    q, k, v = self._qkv(x, positions)
    cfg = self.cfg
    heads = logical_spec(("act_heads",))[0]
    head_axes = heads if heads == logical_spec(("act_kv_heads",))[0] else None
    q, k, v, head_axes = _context_to_heads(q, k, v, head_axes)
    o = kernels.attend(q, k, v, segment_ids=segment_ids, impl=cfg.attention_impl,
                       block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
                       batch_axes=logical_spec(("act_batch",))[0], head_axes=head_axes)
    return self._out(o)

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array,
             v_cache: jax.Array, layer: jax.Array | int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes this step's K/V at [layer, row, positions[row]] of the stacked caches
    [L, B, S, K, H] and attends over that layer's slots; returns (out, k_cache, v_cache)."""
    q, k, v = self._qkv(x, positions)
    rows = jnp.arange(x.shape[0])[:, None]
    k_cache = k_cache.at[layer, rows, positions].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, positions].set(v.astype(v_cache.dtype))
    cfg = self.cfg
    o = kernels.attend_cache(q, k_cache[layer].astype(self.dtype),
                             v_cache[layer].astype(self.dtype), positions,
                             impl=cfg.attention_impl, block_q=cfg.attention_block_q,
                             block_kv=cfg.attention_block_kv)
    return self._out(o), k_cache, v_cache

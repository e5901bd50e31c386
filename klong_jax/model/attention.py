"""Grouped-query attention with partial RoPE, optional qkv bias / QK-norm, masks and a KV cache.

Two entry points share the projections: `__call__` (training / full forward: causal by token index
plus segment-id masking for packed rows) and `decode` (writes K/V at slot = positions[b, t] of a
per-layer cache and lets a query at position p see slots <= p of its own row, so rows of a batch
may sit at different lengths and a reused row simply re-prefills from position 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.model.config import ModelConfig
from klong_jax.model.layers import RMSNorm, constrain, dtype_of, param, rope

_NEG = -1e30


def causal_segment_mask(batch: int, length: int, segment_ids: jax.Array | None) -> jax.Array:
  """[B, T, T] bool: key index <= query index and (if given) the same segment id."""
  idx = jnp.arange(length)
  mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
  """[B, T, S] bool: cache slot s is visible to a query at position p iff s <= p."""
  return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention in fp32. q [B,T,N,H], k/v [B,S,K,H] (N % K == 0), mask [B,T,S]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (h ** -0.5)
  logits = jnp.where(mask[:, None, None, :, :], logits, _NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


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
    mask = causal_segment_mask(x.shape[0], x.shape[1], segment_ids)
    return self._out(attend(q, k, v, mask))

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array,
             v_cache: jax.Array, layer: jax.Array | int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes this step's K/V at [layer, row, positions[row]] of the stacked caches
    [L, B, S, K, H] and attends over that layer's slots; returns (out, k_cache, v_cache)."""
    q, k, v = self._qkv(x, positions)
    rows = jnp.arange(x.shape[0])[:, None]
    k_cache = k_cache.at[layer, rows, positions].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, positions].set(v.astype(v_cache.dtype))
    mask = cache_mask(positions, k_cache.shape[2])
    o = attend(q, k_cache[layer].astype(self.dtype), v_cache[layer].astype(self.dtype), mask)
    return self._out(o), k_cache, v_cache

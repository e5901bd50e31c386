"""Softmax attention with an explicit mask: the definition every other backend is tested against.

Builds the [B,T,S] mask and fp32 [B,K,G,T,S] scores, so it is O(T*S) memory; use it for tests,
tiny CPU runs and single-token decode (S = cache length, T = 1), not for long training rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # Masked logit: finite, so a fully masked row stays NaN-free.


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


def attend_masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention in fp32. q [B,T,N,H], k/v [B,S,K,H] (N % K == 0), mask [B,T,S]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (h ** -0.5)
  logits = jnp.where(mask[:, None, None, :, :], logits, NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal self-attention (by token index) within equal segment ids; q [B,T,N,H], k/v [B,T,K,H]."""
  return attend_masked(q, k, v, causal_segment_mask(q.shape[0], q.shape[1], segment_ids))


def cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    positions: jax.Array) -> jax.Array:
  """Queries at `positions` [B,T] over cache slots [B,S,K,H]: slot s visible iff s <= position."""
  return attend_masked(q, k_cache, v_cache, cache_mask(positions, k_cache.shape[1]))

"""The KV-cache decode path as it was before the in-place cache fix, kept for
benchmarks/sampler_scaling.py's same-run comparison (not used by the library).

Per-layer cache slices went in as scan inputs and came out as stacked scan outputs, then were
written back with `.at[nd:].set`; attention used the einsum `attend` for T=1 too. Same weights,
same math as `Transformer.decode`; only the data movement differs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from klong_jax.model import attention
from klong_jax.model.transformer import Block, KVCache, Transformer, _run_stack


def _attn_decode(attn: attention.Attention, x: jax.Array, positions: jax.Array,
                 k_cache: jax.Array, v_cache: jax.Array) -> tuple[jax.Array, ...]:
  q, k, v = attn._qkv(x, positions)
  rows = jnp.arange(x.shape[0])[:, None]
  k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype))
  v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype))
  mask = attention.cache_mask(positions, k_cache.shape[1])
  o = attention.attend(q, k_cache.astype(attn.dtype), v_cache.astype(attn.dtype), mask)
  return attn._out(o), k_cache, v_cache


def _block_decode(layer: Block, x: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array
                  ) -> tuple[jax.Array, ...]:
  h, k, v = _attn_decode(layer.attn, layer.input_layernorm(x), positions, k, v)
  x, _ = layer._ffn(x + h)
  return x, k, v


def decode(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache
           ) -> tuple[jax.Array, KVCache]:
  """The old `Transformer.decode`."""
  cfg = model.cfg
  x = model.embedder.encode(tokens)
  nd = cfg.first_k_dense

  def step(layer: Block, h: jax.Array, kv: Any) -> tuple[jax.Array, Any]:
    h, k, v = _block_decode(layer, h, positions, *kv)
    return h, (k, v)

  k_all, v_all = cache.k, cache.v
  if model.dense_layers is not None:
    x, (k, v) = _run_stack(model.dense_layers, x, (k_all[:nd], v_all[:nd]), step, False, "none")
    k_all, v_all = k_all.at[:nd].set(k), v_all.at[:nd].set(v)
  if model.moe_layers is not None:
    x, (k, v) = _run_stack(model.moe_layers, x, (k_all[nd:], v_all[nd:]), step,
                           cfg.scan_layers, "none")
    k_all, v_all = k_all.at[nd:].set(k), v_all.at[nd:].set(v)
  return model.embedder.decode(model.final_norm(x)), KVCache(k=k_all, v=v_all)

"""MoE token chunking: the routed experts (dispatch + expert compute + combine) over a row's
sequence in chunks of `moe_token_chunk` tokens, under `lax.scan` with a rematerialized body.

Why: at 32K tokens per row the working set of ONE MoE layer (top-k routed copies, the
all-to-all's worst-case receive buffers, the grouped-matmul intermediates, and the same again
for the backward) dominated the TPU plan's temporaries (docs/performance.md, "Pod-scale
training compute"). A scan holds one chunk's working set; `jax.checkpoint` on the body makes
the backward recompute it per chunk instead of saving every chunk's intermediates.

Exactness: the router runs once over the whole sequence (outside this module), so the MoE
statistics (load-balance loss, expert load / bias update, z-loss, replay flips) are unchanged.
The dropless routed output of a token depends only on that token, so chunked == unchunked
(forward and gradient; tests/model/test_moe_chunk.py). The token-dropping "capacity" compute is
defined per dispatch group and would change with the chunk, so it is refused (config check).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from klong_jax.model.layers import constrain

# fn(x [N,D], idx [N,k], w [N,k], mask [N]) -> (y [N,D], dropped share).
RoutedFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def chunked_routed(fn: RoutedFn, chunk: int, x: jax.Array, idx: jax.Array, w: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """Routed output [B,T,D] of x [B,T,D] (ids / weights [B,T,k], real-token mask [B,T]) computed
  `chunk` tokens of every row at a time (strided chunks, see `split`). A sequence that `chunk`
  does not divide is padded at the end (padding tokens masked out, their rows dropped)."""
  b, t, d = x.shape
  k = idx.shape[-1]
  if chunk <= 0:
    raise ValueError(f"moe_token_chunk must be > 0 to chunk, got {chunk}")
  pad = -t % chunk
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    idx = jnp.pad(idx, ((0, 0), (0, pad), (0, 0)))  # Expert 0: a valid id, output discarded.
    w = jnp.pad(w, ((0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  count = (t + pad) // chunk

  def split(a: jax.Array) -> jax.Array:
    """[B, T, ...] -> [count, B, chunk, ...]: chunk i holds tokens i, i + count, ... of each row
    (strided, so a sequence sharded over `act_seq` stays sharded within every chunk; the
    dropless output is per token, so any partition of the tokens gives the same result)."""
    a = jnp.moveaxis(a.reshape(b, chunk, count, *a.shape[2:]), 2, 0)
    return constrain(a, (None, "act_batch", "act_seq") + (None,) * (a.ndim - 3))

  @jax.checkpoint
  def body(carry: None, xs: tuple[jax.Array, ...]) -> tuple[None, jax.Array]:
    xc, ic, wc, mc = xs
    y, _ = fn(xc.reshape(b * chunk, d), ic.reshape(b * chunk, k), wc.reshape(b * chunk, k),
              mc.reshape(b * chunk))
    return carry, constrain(y.reshape(b, chunk, d), ("act_batch", "act_seq", None))

  _, ys = jax.lax.scan(body, None, (split(x), split(idx), split(w), split(mask)))
  y = jnp.moveaxis(ys, 0, 2).reshape(b, t + pad, d)
  return y[:, :t] if pad else y

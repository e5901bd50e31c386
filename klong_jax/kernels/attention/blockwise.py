"""Blockwise online-softmax (flash-style) attention in pure JAX: no T x S buffer, any backend.

Queries go in blocks of `block_q` (a scan), keys/values in blocks of `block_kv` (a fori_loop). For
causal training rows (q_pos = token index) the loop stops after the block's last query index, a
bound computed from the scan's block index alone: a bound read from the (batch-sharded) positions
made sharded CPU runs deadlock in a collective inside the loop when devices ran different trip
counts. Other callers (KV-cache prefill) loop over every kv block. Scores live per
[block_q, block_kv] tile in fp32 with a running max / sum; the backward pass (`jax.custom_vjp`)
recomputes each tile from q, k, v and the saved log-sum-exp, so neither pass holds a T x S array.
GQA is a [K, G] split of the query heads; K/V heads are never repeated.

Visibility: kv slot s is seen by query t iff s <= q_pos[t] and q_seg[t] == kv_seg[s]. Training
passes q_pos = token index (causal); the KV-cache prefill passes the token positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from klong_jax.kernels.attention.reference import NEG

_NO_ROW = 1e30  # Log-sum-exp of a query that sees nothing (padding): exp(s - it) == 0.
_PAD_SEGMENT = -(2 ** 31)  # Segment id of padded kv slots (real ids are >= 0 in practice).


def _tile_mask(qp: jax.Array, qs: jax.Array, kv_seg: jax.Array, j: jax.Array,
               bk: int) -> jax.Array:
  """[B, 1, 1, bq, bk] bool for kv block j: slot <= query position and same segment."""
  slots = j * bk + jnp.arange(bk)
  ks = jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)
  mask = (slots[None, None, :] <= qp[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
  return mask[:, None, None]


def _kv_blocks(i: jax.Array, bq: int, bk: int, nk: int, causal_index: bool) -> jax.Array | int:
  """kv blocks query block `i` reads: up to its last token index when q_pos is the token index
  (device-uniform: depends on the block index only), else all `nk`."""
  if not causal_index:
    return nk
  return jnp.clip(((i + 1) * bq - 1) // bk + 1, 0, nk)


def _scores(qi: jax.Array, kj: jax.Array, scale: float) -> jax.Array:
  return jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale


def online_softmax_step(s: jax.Array, mask: jax.Array, m: jax.Array, den: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One kv tile of the online softmax: scores `s` [..., S] (masked to NEG), visibility `mask`,
  running max `m` and denominator `den` [...] -> (p [..., S], alpha = rescale of the old
  accumulator, new m, new den). Shared by this kernel and the paged portable attention."""
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  alpha = jnp.exp(m - m_new)
  return p, alpha, m_new, alpha * den + jnp.sum(p, axis=-1)


def _fwd_block(qi, qp, qs, k, v, kv_seg, bk: int, n_blocks):
  """One query block [B,bq,K,G,H] -> (out [B,bq,K,G,H] in q's dtype, lse [B,K,G,bq] fp32)."""
  b, bq, nkv, g, h = qi.shape
  scale = h ** -0.5

  def body(j, carry):
    o, m, den = carry
    kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
    mask = _tile_mask(qp, qs, kv_seg, j, bk)
    s = jnp.where(mask, _scores(qi, kj, scale), NEG)
    p, alpha, m_new, den = online_softmax_step(s, mask, m, den)
    pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vj,
                    preferred_element_type=jnp.float32)
    return alpha[..., None] * o + pv, m_new, den

  init = (jnp.zeros((b, nkv, g, bq, h), jnp.float32), jnp.full((b, nkv, g, bq), NEG, jnp.float32),
          jnp.zeros((b, nkv, g, bq), jnp.float32))
  o, m, den = jax.lax.fori_loop(0, n_blocks, body, init)
  safe = jnp.where(den > 0, den, 1.0)
  out = o / safe[..., None]
  lse = jnp.where(den > 0, m + jnp.log(safe), _NO_ROW)
  return jnp.einsum("bkgqh->bqkgh", out).astype(qi.dtype), lse


def _bwd_block(qi, qp, qs, do, o, lse, k, v, kv_seg, dk, dv, bk: int, n_blocks):
  """Gradients of one query block: returns (dq [B,bq,K,G,H] fp32, dk, dv) with dk/dv
  [B,S,K,H] fp32 accumulated in place over the kv blocks this query block sees."""
  h = qi.shape[-1]
  scale = h ** -0.5
  do_t = jnp.einsum("bqkgh->bkgqh", do)
  delta = jnp.sum(do_t.astype(jnp.float32) * jnp.einsum("bqkgh->bkgqh", o).astype(jnp.float32),
                  axis=-1)

  def body(j, carry):
    dq, dk, dv = carry
    kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
    mask = _tile_mask(qp, qs, kv_seg, j, bk)
    p = jnp.where(mask, jnp.exp(_scores(qi, kj, scale) - lse[..., None]), 0.0)
    dv_j = jnp.einsum("bkgqs,bkgqh->bskh", p.astype(do.dtype), do_t,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgqh,bskh->bkgqs", do_t, vj, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(qi.dtype)
    dq = dq + scale * jnp.einsum("bkgqs,bskh->bqkgh", ds, kj, preferred_element_type=jnp.float32)
    dk_j = scale * jnp.einsum("bkgqs,bqkgh->bskh", ds, qi, preferred_element_type=jnp.float32)
    dk = jax.lax.dynamic_update_slice_in_dim(
        dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=1) + dk_j, j * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(
        dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=1) + dv_j, j * bk, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(qi.shape, jnp.float32), dk, dv)
  return jax.lax.fori_loop(0, n_blocks, body, init)


def _blocks(x: jax.Array, bq: int) -> jax.Array:
  """[B, T, ...] -> [T/bq, B, bq, ...] (scan over query blocks)."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // bq, bq, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_pos, q_seg, kv_seg, bq: int, bk: int, causal_index: bool):
  return _flash_fwd(q, k, v, q_pos, q_seg, kv_seg, bq, bk, causal_index)[0]


def _flash_fwd(q, k, v, q_pos, q_seg, kv_seg, bq, bk, causal_index):
  nk = k.shape[1] // bk

  def step(_, xs):
    i, qi, qp, qs = xs
    return None, _fwd_block(qi, qp, qs, k, v, kv_seg, bk,
                            _kv_blocks(i, bq, bk, nk, causal_index))

  blocks = _blocks(q, bq)
  _, (o, lse) = jax.lax.scan(step, None, (jnp.arange(blocks.shape[0]), blocks,
                                          _blocks(q_pos, bq), _blocks(q_seg, bq)))
  out = _unblocks(o)
  return out, (q, k, v, q_pos, q_seg, kv_seg, out, lse)


def _flash_bwd(bq, bk, causal_index, res, g):
  q, k, v, q_pos, q_seg, kv_seg, out, lse = res
  nk = k.shape[1] // bk

  def step(carry, xs):
    dk, dv = carry
    i, qi, qp, qs, do, o, lse_i = xs
    dq, dk, dv = _bwd_block(qi, qp, qs, do, o, lse_i, k, v, kv_seg, dk, dv, bk,
                            _kv_blocks(i, bq, bk, nk, causal_index))
    return (dk, dv), dq.astype(q.dtype)  # Complete for this block: store in q's dtype.

  zeros = jnp.zeros(k.shape, jnp.float32)
  qb = _blocks(q, bq)
  xs = (jnp.arange(qb.shape[0]), qb, _blocks(q_pos, bq), _blocks(q_seg, bq), _blocks(g, bq),
        _blocks(out, bq), lse)
  (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), xs)
  return (_unblocks(dq), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x: jax.Array, length: int, value: int | float = 0) -> jax.Array:
  pad = length - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def blockwise_attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     q_segment_ids: jax.Array | None = None,
                     kv_segment_ids: jax.Array | None = None, *,
                     block_q: int = 512, block_kv: int = 512,
                     causal_index: bool = False) -> jax.Array:
  """q [B,T,N,H] at positions [B,T] over k/v [B,S,K,H] (slot s sees iff s <= position, same
  segment); lengths need not divide the blocks (padded; padded queries see nothing).
  `causal_index`: q_positions are the token indices 0..T-1 (training), so each query block reads
  only the kv blocks up to its own index."""
  b, t, n, h = q.shape
  s, nkv = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_kv, s)
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  if q_segment_ids is None or kv_segment_ids is None:
    q_segment_ids = jnp.zeros((b, t), jnp.int32)
    kv_segment_ids = jnp.zeros((b, s), jnp.int32)
  qg = _pad(q.reshape(b, t, nkv, n // nkv, h), tp)
  q_pos = _pad(q_positions.astype(jnp.int32), tp, -1)  # Padded queries see nothing,
  kv_seg = _pad(kv_segment_ids.astype(jnp.int32), sp, _PAD_SEGMENT)  # padded slots no one.
  out = _flash(qg, _pad(k, sp), _pad(v, sp), q_pos, _pad(q_segment_ids.astype(jnp.int32), tp),
               kv_seg, bq, bk, causal_index)
  return out[:, :t].reshape(b, t, n, h).astype(v.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              block_q: int = 512, block_kv: int = 512) -> jax.Array:
  """Causal self-attention by token index within equal segment ids (same as reference.attention)."""
  b, t = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return blockwise_attend(q, k, v, pos, segment_ids, segment_ids, block_q=block_q,
                          block_kv=block_kv, causal_index=True)


def cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, *,
                    block_q: int = 512, block_kv: int = 512) -> jax.Array:
  """Queries at `positions` [B,T] over cache slots [B,S,K,H] (same as reference.cache_attention);
  every kv block is read (masked), whatever the positions."""
  return blockwise_attend(q, k_cache, v_cache, positions, block_q=block_q, block_kv=block_kv)

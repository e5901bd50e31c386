"""Attention over the paged KV pool for a flat, ragged batch of query tokens.

Tokens of all scheduled sequences are concatenated (sequence by sequence, each sequence's tokens
at consecutive positions, as `ragged_paged_attention` requires). Token n at position p of
sequence s sees cache slots 0..p of s, read through s's page table. The pool is
[layers * num_pages, page_size, 2 * kv_heads, head_dim] with k/v interleaved on the head axis;
layer l's pages are rows l * num_pages + page, so a layer never slices (copies) the pool.

Two backends, picked by `impl`:
  * "portable": any backend. A loop over page-sized blocks up to the batch's longest real
    position (a while loop: its trip count follows the real lengths, not max_len), gathering each
    token's page of that block, with an online softmax in fp32. No buffer depends on max_len.
  * "ragged": TPU's `jax.experimental.pallas.ops.tpu.ragged_paged_attention` (per-sequence kv
    lengths, pages streamed HBM -> VMEM). TPU only (see `ragged`).
"auto" is "ragged" when compiling for TPU, else "portable".

Under a mesh (`write_and_attend`) the write and the attention run per kv-head shard in a
`shard_map`: the pool is split over its head dim as parallel/rules.paged_pool_spec says (kv heads
over `tensor`; a contiguous shard of the interleaved dim holds whole heads, k and v together) and
the query heads over the same axes (GQA: query head h reads kv head h // group, so a shard's
queries read only its own kv heads). Nothing is gathered and no pool byte crosses chips; a Pallas
kernel could not be partitioned by XLA's SPMD pass anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klong_jax.kernels.attention import blockwise
from klong_jax.kernels.attention.dispatch import current_platform
from klong_jax.kernels.attention.reference import NEG
from klong_jax.parallel import rules as rules_lib

IMPLS = ("auto", "portable", "ragged")


def resolve(impl: str) -> str:
  """The concrete backend for `impl` on the platform being compiled for."""
  if impl not in IMPLS:
    raise ValueError(f"paged attention impl {impl!r} not in {IMPLS}")
  if impl != "auto":
    return impl
  return "ragged" if current_platform() == "tpu" else "portable"


def write_kv(pool: jax.Array, rows: jax.Array, offsets: jax.Array, k: jax.Array,
             v: jax.Array) -> jax.Array:
  """Writes k/v [N, K, H] of N tokens at pool row `rows[n]`, slot `offsets[n]` (interleaved)."""
  n, kv, h = k.shape
  kv_pair = jnp.stack([k, v], axis=2).reshape(n, 2 * kv, h).astype(pool.dtype)
  return pool.at[rows, offsets].set(kv_pair)


def pool_spec(pool: jax.Array) -> jax.P | None:
  """The pool's PartitionSpec under the current mesh and rules (None without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  from klong_jax.model.layers import current_rules
  return rules_lib.paged_pool_spec(dict(mesh.shape), current_rules(), pool.shape)


def constrain_pool(pool: jax.Array) -> jax.Array:
  """Pins the pool to its sharding (the decode loop's carry: the layer shard_maps fix it inside
  a step, this keeps it between steps); a no-op without a mesh."""
  spec = pool_spec(pool)
  return pool if spec is None else jax.lax.with_sharding_constraint(pool, spec)


def write_and_attend(backend: str, q: jax.Array, k: jax.Array, v: jax.Array, pool: jax.Array,
                     base: jax.Array, page: jax.Array, offset: jax.Array,
                     token_pages: jax.Array, positions: jax.Array, valid: jax.Array,
                     page_indices: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array,
                     num_seqs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes k/v [N, K, H] at pool rows `base + page` / slots `offset`, then attends q [N, Nh, H]
  with `backend` -> (out [N, Nh, H], pool). Per kv-head shard under a mesh (module doc)."""

  def local(q, k, v, pool, base, page, offset, token_pages, positions, valid, page_indices,
            kv_lens, cu_q_lens, num_seqs):
    pool = write_kv(pool, base + page, offset, k, v)
    if backend == "portable":
      return portable(q, pool, base, token_pages, positions, valid), pool
    return ragged(q, pool, base, page_indices, kv_lens, cu_q_lens, num_seqs), pool

  args = (q, k, v, pool, jnp.asarray(base, jnp.int32), page, offset, token_pages, positions,
          valid, page_indices, kv_lens, cu_q_lens, num_seqs)
  spec = pool_spec(pool)
  if spec is None:
    return local(*args)
  heads = jax.P(None, spec[2], None)
  rep = (jax.P(),) * 10
  return jax.shard_map(local, in_specs=(heads, heads, heads, spec, *rep),
                       out_specs=(heads, spec), check_vma=False)(*args)


def portable(q: jax.Array, pool: jax.Array, base: jax.Array, token_pages: jax.Array,
             positions: jax.Array, valid: jax.Array) -> jax.Array:
  """q [N, Nh, H] over pool rows `base + token_pages[n, j]` ([N, pages_per_seq]) up to each
  token's position -> [N, Nh, H] in q's dtype (0 for invalid tokens)."""
  n, nh, h = q.shape
  ps, kv2 = pool.shape[1], pool.shape[2]
  kv = kv2 // 2
  g = nh // kv
  qg = q.reshape(n, kv, g, h)
  scale = h ** -0.5
  last = jnp.max(jnp.where(valid, positions, 0))
  n_blocks = jnp.minimum(last // ps + 1, token_pages.shape[1])

  def body(j, carry):
    o, m, den = carry
    page = base + token_pages[:, j]  # [N]
    blk = pool[page].astype(q.dtype)  # [N, ps, 2K, H]
    kj, vj = blk[:, :, 0::2], blk[:, :, 1::2]
    s = jnp.einsum("nkgh,nskh->nkgs", qg, kj, preferred_element_type=jnp.float32) * scale
    slots = j * ps + jnp.arange(ps)
    mask = ((slots[None, :] <= positions[:, None]) & valid[:, None])[:, None, None, :]
    s = jnp.where(mask, s, NEG)
    p, alpha, m_new, den = blockwise.online_softmax_step(s, mask, m, den)
    pv = jnp.einsum("nkgs,nskh->nkgh", p.astype(vj.dtype), vj,
                    preferred_element_type=jnp.float32)
    return alpha[..., None] * o + pv, m_new, den

  init = (jnp.zeros((n, kv, g, h), jnp.float32), jnp.full((n, kv, g), NEG, jnp.float32),
          jnp.zeros((n, kv, g), jnp.float32))
  o, _, den = jax.lax.fori_loop(0, n_blocks, body, init)
  out = o / jnp.where(den > 0, den, 1.0)[..., None]
  return out.reshape(n, nh, h).astype(q.dtype)


def ragged(q: jax.Array, pool: jax.Array, base: jax.Array, page_indices: jax.Array,
           kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
  """TPU ragged paged attention; page_indices [S, pages_per_seq] are offset by `base`.

  TPU only: neither Pallas interpreter runs this kernel in jax 0.10.2 (TPU interpret mode:
  "'ReshapeTransform' object has no attribute 'indices'"; the HLO interpreter: "'TypedInt' object
  has no attribute 'shape'"), so off TPU it is checked against its reference
  (`ref_ragged_paged_attention`, same inputs) and compiled for a TPU topology.
  """
  if current_platform() != "tpu":
    raise NotImplementedError("paged attention impl 'ragged' runs on TPU only (compile for a TPU "
                              "topology, or use 'portable' / 'auto')")
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  blocks = {}
  if jax.default_backend() != "tpu":
    # AOT compile for a TPU topology on a CPU host: the kernel's tuned-size table reads the local
    # device, so size the blocks here: <= 2 MiB of pages per (double-buffered) VMEM buffer.
    page_bytes = pool.shape[1] * pool.shape[2] * pool.shape[3] * pool.dtype.itemsize
    blocks = dict(num_kv_pages_per_block=max(1, min(page_indices.shape[1], 128,
                                                    (2 << 20) // page_bytes)),
                  num_queries_per_block=min(q.shape[0], 32))
  out = ragged_paged_attention(  # The pool is read in its own dtype (no copy).
      q, pool, kv_lens, (page_indices + base).astype(jnp.int32), cu_q_lens, num_seqs,
      sm_scale=q.shape[-1] ** -0.5, **blocks)
  return out.astype(q.dtype)

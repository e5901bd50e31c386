"""Paged KV cache pieces: the page allocator (references, prefix index, LRU eviction, version
clears), the portable paged attention vs the dense reference and vs the TPU kernel's reference
(same inputs), and the kernel itself compiled for a TPU topology (per-chip temp independent of
max_len)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.inference.paged import attention as paged_attention
from klong_jax.inference.paged import scheduler
from klong_jax.inference.paged.cache import TRASH_PAGE, OutOfPages, PageAllocator
from klong_jax.kernels.attention import reference


def test_allocator_refcounts_prefix_pages_and_evicts_lru_unreferenced():
  a = PageAllocator(5, 4)  # Pages 1..4 (0 is the trash page).
  keys = a.keys(list(range(9)))  # Two full blocks.
  p1, p2 = a.allocate(), a.allocate()
  assert TRASH_PAGE not in (p1, p2)
  assert a.register(keys[0], p1) and a.register(keys[1], p2)
  assert not a.register(keys[0], p2)  # Already cached.
  assert a.match(keys) == [p1, p2] and a.refs[p1] == 2  # A hit shares, with a reference.
  a.release([p1, p2])
  assert a.available == 2  # Still referenced once each.
  a.release([p1, p2])
  assert a.available == 4 and a.cached == 2  # Unreferenced but cached: evictable.
  assert a.peek(keys) == 2 and a.evictable_among(keys) == 2
  got = [a.allocate(), a.allocate()]  # Free pages go first...
  assert p1 not in got and p2 not in got and a.evictions == 0
  assert a.allocate() == p2  # ...then the chain's tail (the LRU), keeping its root cached.
  assert a.peek(keys) == 1 and a.evictions == 1
  assert a.allocate() == p1
  with pytest.raises(OutOfPages, match="kv_pages"):
    a.allocate()


def test_allocator_clear_keeps_referenced_pages_and_salts_keys():
  a = PageAllocator(4, 2)
  keys = a.keys([1, 2, 3, 4])
  held, idle = a.allocate(), a.allocate()
  a.register(keys[0], held)
  a.register(keys[1], idle)
  a.release([idle])
  a.clear(1)
  assert a.cached == 0 and a.refs[held] == 1 and a.available == 2
  assert a.keys([1, 2, 3, 4]) != keys  # The new version salts the chain.
  with pytest.raises(ValueError, match="kv_pages"):
    PageAllocator(1, 2)


def test_chunk_planning_serves_decoding_rows_first():
  assert scheduler.plan_chunks(3, [10, 5], 8) == [5, 0]
  assert scheduler.plan_chunks(0, [3, 10], 8) == [3, 5]
  assert scheduler.bucket(17, 16) == 32 and scheduler.bucket(1, 16) == 16


def _paged_case(rng, seqs, page_size=4, kv=2, heads=4, h=16, layers=2):
  """Random K/V of `seqs` = [(kv_len, q_len)] scattered over shuffled pages of a 2-layer pool,
  plus the same K/V as dense rows; returns everything both attentions need (layer 1)."""
  per_seq = [int(np.ceil(n / page_size)) for n, _ in seqs]
  num_pages = sum(per_seq) + 2  # + the trash page + one spare page no sequence uses (last).
  ids = rng.permutation(np.arange(1, num_pages - 1)).tolist()
  width = max(per_seq)
  pool = np.zeros((layers * num_pages, page_size, 2 * kv, h), np.float32)
  dense_len = width * page_size
  k_dense = np.zeros((len(seqs), dense_len, kv, h), np.float32)
  v_dense = np.zeros_like(k_dense)
  table = np.zeros((len(seqs), width), np.int32)
  for s, ((n, _), m) in enumerate(zip(seqs, per_seq, strict=True)):
    table[s, :m] = [ids.pop() for _ in range(m)]
    k_dense[s, :n] = rng.normal(size=(n, kv, h))
    v_dense[s, :n] = rng.normal(size=(n, kv, h))
    for j in range(m):
      blk = slice(j * page_size, (j + 1) * page_size)
      pair = np.stack([k_dense[s, blk], v_dense[s, blk]], axis=2).reshape(page_size, 2 * kv, h)
      pool[num_pages + table[s, j]] = pair  # Layer 1.
  tokens = sum(q for _, q in seqs)
  q = rng.normal(size=(tokens + 3, heads, h)).astype(np.float32)  # 3 padding tokens.
  seq = np.concatenate([np.full(qn, s) for s, (_, qn) in enumerate(seqs)] + [np.zeros(3)])
  pos = np.concatenate([np.arange(n - qn, n) for n, qn in seqs] + [np.zeros(3)])
  valid = np.arange(tokens + 3) < tokens
  cu = np.concatenate([[0], np.cumsum([qn for _, qn in seqs])])
  return dict(q=q, pool=pool, num_pages=num_pages, table=table, seq=seq.astype(np.int32),
              pos=pos.astype(np.int32), valid=valid, k=k_dense, v=v_dense, cu=cu.astype(np.int32),
              kv_lens=np.asarray([n for n, _ in seqs], np.int32))


@pytest.mark.slow  # The kernel reference runs op by op (eager).
def test_portable_matches_dense_reference_and_the_tpu_kernels_reference():
  rng = np.random.default_rng(0)
  c = _paged_case(rng, [(13, 1), (9, 5), (4, 4)])  # Decode, a chunk, a whole prompt.
  got = jax.jit(paged_attention.portable)(
      jnp.asarray(c["q"]), jnp.asarray(c["pool"]), jnp.int32(c["num_pages"]),
      jnp.asarray(c["table"])[c["seq"]], jnp.asarray(c["pos"]), jnp.asarray(c["valid"]))
  got = np.asarray(got)
  n = int(c["valid"].sum())
  for s in range(3):  # Dense reference: each sequence's queries over its own cache row.
    sel = np.where(c["valid"] & (c["seq"] == s))[0]
    want = reference.cache_attention(jnp.asarray(c["q"][sel][None]), jnp.asarray(c["k"][s:s + 1]),
                                     jnp.asarray(c["v"][s:s + 1]), jnp.asarray(c["pos"][sel][None]))
    np.testing.assert_allclose(got[sel], np.asarray(want)[0], atol=2e-6)
  assert np.all(got[n:] == 0)  # Padding tokens see nothing.
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
  kernel_ref = ref_ragged_paged_attention(
      jnp.asarray(c["q"]), jnp.asarray(c["pool"]), jnp.asarray(c["kv_lens"]),
      jnp.asarray(c["table"] + c["num_pages"]), jnp.asarray(c["cu"]), jnp.asarray([3], jnp.int32),
      sm_scale=c["q"].shape[-1] ** -0.5)
  np.testing.assert_allclose(got[:n], np.asarray(kernel_ref)[:n], atol=2e-6)


def test_portable_reads_only_blocks_up_to_the_longest_position():
  """Pages past every query's position are never read: NaN there changes nothing."""
  rng = np.random.default_rng(1)
  c = _paged_case(rng, [(5, 1), (3, 3)])
  pool = c["pool"].copy()
  spare = c["num_pages"] - 1
  table = np.concatenate([c["table"], np.full((2, 6), spare, np.int32)], axis=1)  # Past the end.
  pool[c["num_pages"] + spare] = np.nan
  args = (jnp.asarray(c["q"]), jnp.int32(c["num_pages"]))
  got = jax.jit(paged_attention.portable)(args[0], jnp.asarray(pool), args[1],
                                          jnp.asarray(table)[c["seq"]], jnp.asarray(c["pos"]),
                                          jnp.asarray(c["valid"]))
  assert np.all(np.isfinite(np.asarray(got)))


def test_ragged_off_tpu_names_the_fix():
  with pytest.raises(NotImplementedError, match="TPU only"):
    paged_attention.ragged(jnp.zeros((1, 2, 4)), jnp.zeros((2, 2, 2, 4)), jnp.int32(0),
                           jnp.zeros((1, 1), jnp.int32), jnp.ones(1, jnp.int32),
                           jnp.asarray([0, 1], jnp.int32), jnp.ones(1, jnp.int32))
  with pytest.raises(ValueError, match="portable"):
    paged_attention.resolve("flash")


@pytest.mark.slow
def test_ragged_kernel_compiles_for_tpu_with_max_len_independent_temp():
  pytest.importorskip("libtpu")
  from benchmarks import _paged_tpu
  rows = [_paged_tpu.tpu_compile_attention(n) for n in (1024, 8192)]
  assert all(r["mosaic_custom_call"] for r in rows), rows
  assert rows[0]["temp_bytes"] == rows[1]["temp_bytes"], rows
  assert jax.default_backend() == "cpu"

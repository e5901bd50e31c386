"""Automatic prefix caching: KV of fixed-size prompt blocks, keyed by a hash chain, reused by
later requests that start with the same tokens (vLLM-style, but copy-in rather than paged).

A prompt is cut into full blocks of `block_size` tokens; block i's key hashes block i's tokens
with block i-1's key (the root is salted with the policy version), so a key names the whole
prefix up to and including that block. The KV of cached blocks lives in a device pool
(a KVCache with one "row" per block). On admit the engine copies the longest cached prefix into
the request's cache row (`restore`) and prefills only the rest; after prefill it copies the
prompt's new full blocks out of the row into the pool (`store`). Because blocks are copied, a
pool block is never shared with a live row and can be evicted (LRU) at any time.
The cache must be `clear`ed whenever the weights change: its KV belongs to one policy version.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def block_keys(tokens: Sequence[int], block_size: int, salt: int = 0) -> list[bytes]:
  """Chained 128-bit keys of the full blocks of `tokens` (a partial last block gets none)."""
  keys, parent = [], salt.to_bytes(8, "little", signed=True)
  for i in range(len(tokens) // block_size):
    block = np.asarray(tokens[i * block_size:(i + 1) * block_size], np.int64).tobytes()
    parent = hashlib.blake2b(parent + block, digest_size=16).digest()
    keys.append(parent)
  return keys


class BlockIndex:
  """Host-side table key -> pool block id with LRU eviction over a fixed number of blocks."""

  def __init__(self, num_blocks: int):
    if num_blocks < 1:
      raise ValueError(f"the prefix cache needs at least 1 block, got {num_blocks}")
    self.num_blocks = num_blocks
    self._table: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first.
    self._free = list(range(num_blocks - 1, -1, -1))
    self.evictions = 0

  def __len__(self) -> int:
    return len(self._table)

  def __contains__(self, key: bytes) -> bool:
    return key in self._table

  def match(self, keys: Sequence[bytes]) -> list[int]:
    """Block ids of the longest run of `keys` present from the start; marks them used."""
    ids = []
    for key in keys:
      if key not in self._table:
        break
      ids.append(self._table[key])
    self._touch(keys[:len(ids)])
    return ids

  def insert(self, keys: Sequence[bytes]) -> list[int | None]:
    """Allocates a block per new key (evicting LRU blocks outside `keys`); returns the new ids
    in order (None: already cached, or no block could be freed)."""
    keep = set(keys)
    out: list[int | None] = []
    for key in keys:
      if key in self._table:
        out.append(None)
        continue
      block = self._allocate(keep)
      if block is None:
        out.extend([None] * (len(keys) - len(out)))  # Later blocks are useless without this one.
        break
      self._table[key] = block
      out.append(block)
    self._touch(keys)
    return out

  def clear(self) -> None:
    self._table.clear()
    self._free = list(range(self.num_blocks - 1, -1, -1))

  def _allocate(self, keep: set[bytes]) -> int | None:
    if self._free:
      return self._free.pop()
    victim = next((k for k in self._table if k not in keep), None)
    if victim is None:
      return None
    self.evictions += 1
    return self._table.pop(victim)

  def _touch(self, keys: Sequence[bytes]) -> None:
    # Deepest block first, root last: the root ends most recent, so LRU evicts a chain's tail
    # before its head and a cached prefix never loses a middle block to eviction first.
    for key in reversed(keys):
      if key in self._table:
        self._table.move_to_end(key)


def _check_layout(cache: Any, axes: Any) -> None:
  for leaf, axis in zip(jax.tree.leaves(cache), jax.tree.leaves(axes), strict=True):
    if axis != 1 or leaf.ndim < 3:
      raise ValueError(f"prefix caching needs [layers, batch, seq, ...] KV leaves, got shape "
                       f"{leaf.shape} with batch axis {axis}")


@functools.partial(jax.jit, donate_argnums=(0,))
def _restore(cache: Any, pool: Any, row: jax.Array, ids: jax.Array, n: jax.Array) -> Any:
  """Writes pool blocks ids[:n] into cache row `row` at slots 0..n*block-1."""

  def one(x: jax.Array, p: jax.Array) -> jax.Array:
    nb, bs = ids.shape[0], p.shape[2]
    seg = jnp.take(p, ids, axis=1)  # [L, nb, bs, ...]
    seg = seg.reshape(seg.shape[0], nb * bs, *seg.shape[3:])
    cur = jax.lax.dynamic_slice_in_dim(x[:, row], 0, nb * bs, axis=1)
    keep = (jnp.arange(nb * bs) < n * bs).reshape((1, -1) + (1,) * (seg.ndim - 2))
    return x.at[:, row, :nb * bs].set(jnp.where(keep, seg, cur).astype(x.dtype))

  return jax.tree.map(one, cache, pool)


@functools.partial(jax.jit, donate_argnums=(1,))
def _store(cache: Any, pool: Any, row: jax.Array, ids: jax.Array) -> Any:
  """Copies block j of cache row `row` into pool block ids[j] (ids >= pool size: skipped)."""

  def one(x: jax.Array, p: jax.Array) -> jax.Array:
    nb, bs = ids.shape[0], p.shape[2]
    seg = x[:, row, :nb * bs]
    seg = seg.reshape(seg.shape[0], nb, bs, *seg.shape[2:])
    return p.at[:, ids].set(seg.astype(p.dtype), mode="drop")

  return jax.tree.map(one, cache, pool)


class PrefixCache:
  """Block-granular KV reuse for one Sampler: `lookup` + `restore` before prefill, `store`
  after; `clear` on every weight change. Budget: `max_blocks`, or `max_bytes` of pool KV."""

  def __init__(self, sampler: Any, *, block_size: int = 16, max_blocks: int | None = None,
               max_bytes: int | None = None):
    if block_size < 1 or block_size > sampler.max_len:
      raise ValueError(f"block_size must be in [1, max_len={sampler.max_len}], got {block_size}")
    _check_layout(sampler.cache, sampler._batch_axes)
    self.block_size = block_size
    self.bytes_per_block = sum(
        int(np.prod(x.shape)) // (x.shape[1] * x.shape[2]) * block_size * x.dtype.itemsize
        for x in jax.tree.leaves(sampler.cache))
    if (max_blocks is None) == (max_bytes is None):
      raise ValueError("give exactly one of max_blocks or max_bytes")
    num_blocks = max_blocks if max_blocks is not None else max_bytes // self.bytes_per_block
    self.index = BlockIndex(int(num_blocks))
    self.blocks_per_row = sampler.max_len // block_size  # Static width of the copy kernels.
    self.version = sampler.policy_version
    self.pool = self._make_pool(sampler)

  @property
  def num_blocks(self) -> int:
    return self.index.num_blocks

  def _make_pool(self, sampler: Any) -> Any:
    model = sampler.model()
    make = lambda: model.init_cache(batch=self.num_blocks, max_len=self.block_size,
                                    dtype=sampler.cache_dtype)
    if sampler.mesh is None:
      return jax.jit(make)()
    from jax.sharding import NamedSharding, PartitionSpec
    return jax.jit(make, out_shardings=NamedSharding(sampler.mesh, PartitionSpec()))()

  def keys(self, tokens: Sequence[int]) -> list[bytes]:
    """Keys of the full blocks of `tokens` under the current policy version."""
    return block_keys(tokens, self.block_size, self.version)

  def clear(self, version: int) -> None:
    """Forgets every block (their KV came from other weights); new keys use `version`."""
    self.index.clear()
    self.version = int(version)

  def lookup(self, keys: Sequence[bytes], prompt_len: int) -> list[int]:
    """Pool ids of the longest cached prefix, leaving >= 1 prompt token to prefill (its logits
    give the first sampled token)."""
    usable = min(len(keys), (prompt_len - 1) // self.block_size, self.blocks_per_row)
    return self.index.match(keys[:usable])

  def restore(self, cache: Any, row: int, ids: Sequence[int]) -> Any:
    """`cache` with pool blocks `ids` written into `row` from slot 0 (the input is donated)."""
    padded = np.zeros(self.blocks_per_row, np.int32)
    padded[:len(ids)] = ids
    return _restore(cache, self.pool, np.int32(row), padded, np.int32(len(ids)))

  def store(self, cache: Any, row: int, keys: Sequence[bytes]) -> int:
    """Copies the row's full prompt blocks that the pool lacks into it; returns blocks stored.

    Blocks already cached are skipped; ones evicted since `lookup` are put back from the row.
    """
    keys = keys[:self.blocks_per_row]
    ids = np.full(self.blocks_per_row, self.num_blocks, np.int32)  # Out of range: not copied.
    for j, block in enumerate(self.index.insert(keys)):
      if block is not None:
        ids[j] = block
    stored = int((ids < self.num_blocks).sum())
    if stored:
      self.pool = _store(cache, self.pool, np.int32(row), ids)
    return stored

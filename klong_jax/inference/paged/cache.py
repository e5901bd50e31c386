"""Host-side bookkeeping of the paged KV cache: page allocation, reference counts, the prefix
index (hash-chained prompt blocks -> pages) and LRU eviction of unreferenced cached pages.

The device pool is one array [layers, num_pages, page_size, 2 * kv_heads, head_dim] holding k and
v interleaved on the head axis (k head j at 2j, v at 2j + 1): the layout TPU's
`ragged_paged_attention` reads, so no per-step copy is needed there. Page 0 is a trash page that
is never allocated: padding tokens write into it. A request owns a page table (list of page ids);
a prefix-cache hit puts the cached pages into the table with one more reference (no copy).
Pages whose last reference drops stay cached (LRU, evicted on demand) when they hold a prompt
block of the current policy version, else return to the free list.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from klong_jax.inference.prefix_cache import block_keys

TRASH_PAGE = 0


class OutOfPages(RuntimeError):
  """No free or evictable page is left (the scheduler's reservations should prevent this)."""


class PageAllocator:
  """Reference-counted pages with a prefix index and LRU eviction of unreferenced cached pages."""

  def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True,
               version: int = 0):
    if num_pages < 2:
      raise ValueError(f"the page pool needs >= 2 pages (page 0 is the trash page), got "
                       f"{num_pages}: raise serve.kv_pages")
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    self.num_pages, self.page_size = num_pages, page_size
    self.prefix_caching = prefix_caching
    self.version = int(version)
    self.refs = [0] * num_pages
    self._free = list(range(num_pages - 1, 0, -1))  # Pop from the end: lowest id first.
    self._index: dict[bytes, int] = {}  # Prefix key -> page.
    self._key_of: dict[int, bytes] = {}  # Page -> its prefix key (cached pages only).
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # Evictable, LRU 1st.
    self.evictions = 0

  # ---- capacity ------------------------------------------------------------------------------

  @property
  def available(self) -> int:
    """Pages that an allocation can get now: free plus unreferenced cached ones."""
    return len(self._free) + len(self._lru)

  @property
  def cached(self) -> int:
    return len(self._index)

  def keys(self, tokens: Sequence[int]) -> list[bytes]:
    """Keys of the full page-sized blocks of `tokens` under the current version."""
    return block_keys(tokens, self.page_size, self.version)

  # ---- allocation ----------------------------------------------------------------------------

  def allocate(self) -> int:
    """A fresh page with one reference (a free page, else the least recently used cached one)."""
    if self._free:
      page = self._free.pop()
    elif self._lru:
      page, _ = self._lru.popitem(last=False)
      del self._index[self._key_of.pop(page)]
      self.evictions += 1
    else:
      raise OutOfPages(f"all {self.num_pages - 1} KV pages are referenced: raise serve.kv_pages "
                       "or lower serve.max_batch")
    self.refs[page] = 1
    return page

  def release(self, pages: Sequence[int]) -> None:
    """Drops one reference of each page; unreferenced cached pages become evictable (a chain's
    deepest block first, so its root stays longest), others free."""
    for page in reversed(list(pages)):
      if page == TRASH_PAGE:
        continue
      self.refs[page] -= 1
      if self.refs[page] < 0:
        raise AssertionError(f"page {page} released more often than referenced")
      if self.refs[page] == 0:
        if page in self._key_of:
          self._lru[page] = None
          self._lru.move_to_end(page)
        else:
          self._free.append(page)

  # ---- prefix index --------------------------------------------------------------------------

  def match(self, keys: Sequence[bytes]) -> list[int]:
    """Pages of the longest cached run of `keys` from the start, each with one more reference
    taken for the caller."""
    pages = []
    if not self.prefix_caching:
      return pages
    for key in keys:
      page = self._index.get(key)
      if page is None:
        break
      pages.append(page)
    for page in pages:
      self.refs[page] += 1
      self._lru.pop(page, None)
    return pages

  def peek(self, keys: Sequence[bytes]) -> int:
    """Length of the longest cached run of `keys` from the start (no references taken)."""
    n = 0
    for key in keys if self.prefix_caching else ():
      if key not in self._index:
        break
      n += 1
    return n

  def evictable_among(self, keys: Sequence[bytes]) -> int:
    """How many pages `match(keys)` would take out of the evictable set (for admission checks)."""
    n = 0
    for key in keys if self.prefix_caching else ():
      page = self._index.get(key)
      if page is None:
        break
      n += self.refs[page] == 0
    return n

  def register(self, key: bytes, page: int) -> bool:
    """Records that referenced `page` holds the prompt block `key` (current version); False when
    the key is already cached (another page holds it) or caching is off."""
    if not self.prefix_caching or key in self._index or page in self._key_of:
      return False
    self._index[key] = page
    self._key_of[page] = key
    return True

  def __contains__(self, key: bytes) -> bool:
    return key in self._index

  def clear(self, version: int) -> None:
    """Forgets every cached block (their KV came from other weights); referenced pages stay with
    their requests, unreferenced ones are freed. New keys use `version`."""
    for page in list(self._lru):
      self._free.append(page)
    self._lru.clear()
    self._index.clear()
    self._key_of.clear()
    self.version = int(version)

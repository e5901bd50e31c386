"""PagedEngine: the Engine's request API over a paged KV cache (paged/cache.py), with chunked
prefill under a per-step token budget and several decode steps per device call.

Each `step()` (1) applies a pending weight swap (cached pages of the old version are forgotten;
running requests keep theirs), (2) admits waiting requests while rows and pages allow (a request
reserves the pages its whole generation can need, so it is never preempted; a prefix-cache hit
takes references on the cached pages instead of copying them), (3) runs either one mixed device
call (every decoding row's next token + prefill chunks within `token_budget`) while any prompt is
being prefilled, or one call of `decode_steps` decode iterations with on-device sampling and stop
checks. Tokens are stamped with the version of the weights of the call that produced them.
Sampling is the dense Engine's (same seeds and counters), so tokens match it exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klong_jax.inference.engine import ContextLengthError, Engine, Request
from klong_jax.inference.paged import model as paged_model
from klong_jax.inference.paged import scheduler
from klong_jax.inference.paged.cache import PageAllocator
from klong_jax.inference.sampler import Sampler

log = logging.getLogger(__name__)


def pool_pages(model_cfg: Any, max_batch: int, max_len: int, page_size: int, cache_dtype: Any,
               extra_mb: float = 0.0) -> int:
  """Pages for `max_batch` full-length requests + `extra_mb` of prefix-cache pages + trash page:
  the dense Engine's memory (rows + prefix pool) as a page pool (the server's and the serving
  plan's default when serve.kv_pages is 0)."""
  cfg = model_cfg
  page_bytes = (cfg.num_layers * page_size * 2 * cfg.num_kv_heads * cfg.head_dim *
                jnp.dtype(cache_dtype).itemsize)
  rows = max_batch * math.ceil(max_len / page_size)
  return rows + int(extra_mb * (1 << 20)) // page_bytes + 1


def default_num_pages(sampler: Sampler, page_size: int, extra_mb: float = 0.0) -> int:
  """`pool_pages` for the sampler's model, rows, context and cache dtype."""
  return pool_pages(sampler.model_cfg, sampler.max_batch, sampler.max_len, page_size,
                    sampler.cache_dtype, extra_mb)


class PagedEngine(Engine):
  """Continuous batching over a shared page pool; same submit/step/generate API as Engine."""

  def __init__(self, sampler: Sampler, tokenizer: Any = None, *, schedule: str = "continuous",
               stop_token_ids: Sequence[int] = (), seed: int = 0, replica_id: int | None = None,
               page_size: int = 16, num_pages: int = 0, prefix_caching: bool = True,
               token_budget: int = 256, decode_steps: int = 4,
               min_bucket: int = scheduler.MIN_BUCKET,
               attention_impl: str = "auto"):
    super().__init__(sampler, tokenizer, schedule=schedule, stop_token_ids=stop_token_ids,
                     seed=seed, replica_id=replica_id)
    b, max_len = sampler.max_batch, sampler.max_len
    if token_budget < b:
      raise ValueError(f"token_budget {token_budget} < max_batch {b}: every decoding row needs a "
                       "token per step; raise serve.token_budget")
    if decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
    self.page_size = page_size
    self.pages_per_seq = math.ceil(max_len / page_size)
    # The pool need not hold a full max_len row: a request is refused at submit only when its own
    # prompt + max_tokens needs more pages than the whole pool (check_fits).
    num_pages = num_pages or b * self.pages_per_seq + 1
    self.alloc = PageAllocator(num_pages, page_size, prefix_caching=prefix_caching,
                               version=sampler.policy_version)
    self.token_budget, self.decode_steps, self.min_bucket = token_budget, decode_steps, min_bucket
    self.attention_impl = attention_impl
    self.pool = self._make_pool(num_pages)
    self._reserved = 0  # Pages promised to admitted requests but not yet allocated.
    self._claimed: dict[bytes, int] = {}  # Prompt blocks being prefilled -> claim count.
    self._order: list[Request] = []  # Admitted requests, oldest first (prefill priority).
    # Compile every step shape in the engine thread before its first step (`start`), so the
    # server accepts requests at once and none compiles mid-serving.
    self.precompile_on_start = False
    # Multi-host (inference/multihost.py): process 0's link to the followers, which run every
    # device call it announces; None on one process (no messages, outputs left as sharded).
    self.link: Any = None
    self._replicate = jax.process_count() > 1

  def attach(self, link: Any) -> None:
    """Makes this engine the multi-host leader: each device call is first sent over `link`."""
    self.link = link

  def _announce(self, op: str, arrays: dict[str, np.ndarray] | None = None, **meta: Any) -> None:
    """Multi-host: tells the followers the call about to run (a no-op on one process)."""
    if self.link is not None:
      self.link.send(op, arrays, version=self.sampler.policy_version, **meta)

  # ---- device pool ---------------------------------------------------------------------------

  def _make_pool(self, num_pages: int) -> jax.Array:
    """The zeroed pool [layers * pages, page, 2 * kv_heads, head_dim], laid out on the serving
    mesh by the rules (parallel/rules.paged_pool_spec): kv heads over `tensor`, every page on
    every chip of the other axes.

    Why pages are replicated over the batch axes (data x expert) rather than split into
    per-shard page ranges: a page id is global (one allocator, prefix hits share pages between
    any rows), attention needs no cross-chip traffic, and the MoE's all-to-all already mixes
    every row's tokens across the expert axis. The cost: each chip holds 1/tensor of the whole
    pool (not 1/(tensor x data x expert)), and the batch axes repeat the attention reads; the
    serving plan reports that pool per chip (launch/serve_plan.py, engine "paged")."""
    s = self.sampler
    cfg = s.model_cfg
    shape = (cfg.num_layers * num_pages, self.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    make = lambda: jnp.zeros(shape, s.cache_dtype)
    if s.mesh is None:
      return jax.jit(make)()
    from klong_jax.parallel import rules as rules_lib
    rules = s.rules if s.rules is not None else rules_lib.LOGICAL_RULES
    return jax.jit(make, out_shardings=rules_lib.paged_pool_sharding(s.mesh, rules, shape))()

  @property
  def pool_bytes(self) -> int:
    return int(self.pool.size * self.pool.dtype.itemsize)

  def _static(self) -> dict[str, Any]:
    return dict(impl=self.attention_impl, num_pages=self.alloc.num_pages)

  def precompile(self) -> int:
    """Compiles every mixed-step token bucket and the decode call now (start-up), by running
    them on all-padding batches (their writes go to the trash page); returns shapes compiled."""
    self._announce("precompile")
    s = self.sampler
    sizes, n = [], self.min_bucket
    while n < self.token_budget:
      sizes.append(n)
      n *= 2
    sizes.append(scheduler.bucket(self.token_budget, self.min_bucket))
    for n in sizes:
      self.run_mixed(scheduler.mixed_batch([], self._settings, s.max_batch, self.pages_per_seq,
                                           n))
    self.run_decode(self._decode_state([]))
    self.pool = jax.block_until_ready(self.pool)
    return len(sizes) + 1

  def run_mixed(self, batch: dict[str, np.ndarray]) -> tuple[Any, ...]:
    """The mixed-step device call on `batch` -> (tokens, logprobs, top, routing) on device."""
    s = self.sampler
    with s._context():
      *out, self.pool = paged_model.mixed_step(s.graphdef, s.params, s.rest, self.pool, batch,
                                               replicate=self._replicate, **self._static())
    return tuple(out)

  def run_decode(self, state: dict[str, np.ndarray]) -> tuple[Any, ...]:
    """The `decode_steps` device call on `state` -> (tokens, logprobs, top, routing)."""
    s = self.sampler
    with s._context():
      *out, self.pool = paged_model.decode_steps(
          s.graphdef, s.params, s.rest, self.pool, state, steps=self.decode_steps,
          replicate=self._replicate, **self._static())
    return tuple(out)

  def _before_swap(self, params: Any, version: int) -> None:
    """Multi-host: the followers load the same policy version at this same point."""
    if self.link is None:
      return
    from klong_jax.inference import reload  # noqa: PLC0415
    if not isinstance(params, reload.PolicySwap):
      raise ValueError("a multi-host server swaps weights only from a policy directory "
                       "(reload.PolicySwap, as PolicyWatcher schedules); in-memory params "
                       "cannot reach the other processes")
    self._announce("swap", path=str(params.path), to=int(version),
                   root="" if params.root is None else str(params.root))

  def stop(self) -> None:
    """Stops the engine thread; multi-host, then tells the followers to stop too."""
    super().stop()
    if self.link is not None:
      self.link.close()

  def check_fits(self, prompt_len: int, max_tokens: int | None) -> None:
    """The context limit, and the pool: a request must fit in the pages it could ever get."""
    super().check_fits(prompt_len, max_tokens)
    end = min(prompt_len + (max_tokens if max_tokens is not None else self.sampler.max_len),
              self.sampler.max_len)
    need = math.ceil((end - 1) / self.page_size)
    if need > self.alloc.num_pages - 1:
      raise ContextLengthError(
          f"the request needs {need} KV pages of {self.page_size} tokens ({prompt_len} prompt "
          f"tokens, max_tokens={max_tokens}) but the pool has {self.alloc.num_pages - 1}: lower "
          "max_tokens or raise serve.kv_pages")

  def _loop(self) -> None:
    if self.precompile_on_start:
      self.precompile_on_start = False
      start = time.monotonic()
      try:
        shapes = self.precompile()
        log.info("precompiled %d step shapes in %.1fs", shapes, time.monotonic() - start)
      except Exception:  # Serving still works: shapes then compile on first use.
        log.exception("precompiling the paged engine failed")
    super()._loop()

  # ---- scheduling ----------------------------------------------------------------------------

  def step(self) -> None:
    """One iteration: swap weights, admit, then one mixed call or one multi-step decode call."""
    self._swap_pending()
    if self.alloc.version != self.sampler.policy_version:  # Cached KV is of other weights.
      self.on_new_version(self.sampler.policy_version)
    self._retire_cancelled()
    self._admit()
    if any(self._prefilling(r) for r in self._order):
      self._mixed()
    elif self._order:
      self._multi_decode()

  def on_new_version(self, version: int) -> None:
    """Frees the idle cached pages of the old weights (running requests keep theirs)."""
    self.alloc.clear(version)
    self._claimed.clear()
    self._routing_blocks.clear()

  @staticmethod
  def _prefilling(req: Request) -> bool:
    return req.prefilled < len(req.prompt_ids)

  def _pages_needed(self, req: Request) -> int:
    """Pages for every position the request can write: its prompt and all but its last token."""
    mt = req.params.max_tokens
    end = len(req.prompt_ids) + (mt if mt is not None else self.sampler.max_len)
    return math.ceil((min(end, self.sampler.max_len) - 1) / self.page_size)

  def _admit(self) -> None:
    free = self._free_rows()
    ps, admitted, skipped = self.page_size, [], []
    with self._lock:
      while free and (req := self._next_waiting(admitted)) is not None:
        keys = self.alloc.keys(req.prompt_ids)
        usable = keys[:(len(req.prompt_ids) - 1) // ps]
        hits = self.alloc.peek(usable)
        if hits < len(keys) and keys[hits] in self._claimed:
          skipped.append(req)  # Another request is computing its next block: reuse it later.
          continue
        need = self._pages_needed(req) - hits
        if self.alloc.available - self.alloc.evictable_among(usable) - self._reserved < need:
          self._waiting.appendleft(req)  # Not enough pages: wait (FIFO) for some to free.
          break
        req.pages = self.alloc.match(usable)
        req.reserved, req.prefilled, req.registered = need, hits * ps, hits
        req.keys, req.kv_version, req.hit_tokens = keys, self.alloc.version, hits * ps
        self._reserved += need
        for key in keys[hits:]:
          self._claimed[key] = self._claimed.get(key, 0) + 1
        self._seat(req, free.pop(0))
        self._order.append(req)
        admitted.append(req)
      self._waiting.extendleft(reversed(skipped))
    for req in admitted:
      if req.row < 0:
        self._finish(req, "length")
      else:
        self.stats["prefix_cache_hit_tokens_total"] += req.hit_tokens
        req.cached_tokens = req.hit_tokens
        if req.params.return_routing:
          self._restore_routing_pages(req)

  def _grow(self, req: Request, last_position: int) -> None:
    """Allocates the request's pages up to the one holding `last_position` (from its reserve)."""
    while len(req.pages) * self.page_size <= last_position:
      evicted = self.alloc.evictions
      req.pages.append(self.alloc.allocate())
      self.stats["prefix_cache_evicted_blocks_total"] += self.alloc.evictions - evicted
      req.reserved -= 1
      self._reserved -= 1

  def _unclaim(self, req: Request) -> None:
    for key in getattr(req, "keys", [])[req.registered:]:
      if key in self._claimed:
        self._claimed[key] -= 1
        if self._claimed[key] <= 0:
          del self._claimed[key]

  def _register(self, req: Request) -> None:
    """Puts the request's fully prefilled prompt blocks into the prefix index."""
    done = min(req.prefilled // self.page_size, len(req.keys))
    for i in range(req.registered, done):
      key = req.keys[i]
      c = self._claimed.get(key, 0)
      if c <= 1:
        self._claimed.pop(key, None)
      else:
        self._claimed[key] = c - 1
      if req.kv_version == self.alloc.version and self.alloc.register(key, req.pages[i]):
        self.stats["prefix_cache_stored_blocks_total"] += 1
        if req.routing_prompt is not None:
          b = self.page_size
          self._routing_blocks[key] = req.routing_prompt[i * b:(i + 1) * b].copy()
    req.registered = max(req.registered, done)

  # ---- device calls --------------------------------------------------------------------------

  def _mixed(self) -> None:
    """One ragged call: a token per decoding row, then prefill chunks within the budget."""
    decoding = [r for r in self._order if not self._prefilling(r)]
    prefilling = [r for r in self._order if self._prefilling(r)]
    chunks = scheduler.plan_chunks(len(decoding), [len(r.prompt_ids) - r.prefilled
                                                   for r in prefilling], self.token_budget)
    work: list[scheduler.Work] = []
    for req in decoding:
      pos = len(req.prompt_ids) + len(req.token_ids) - 1
      self._grow(req, pos)
      work.append(scheduler.Work(req.row, [req.token_ids[-1]], pos, req.pages, True,
                                 len(req.token_ids)))
    chunked = []
    for req, c in zip(prefilling, chunks, strict=True):
      if c == 0:
        continue
      start = req.prefilled
      self._grow(req, start + c - 1)
      last = start + c == len(req.prompt_ids)
      work.append(scheduler.Work(req.row, req.prompt_ids[start:start + c], start, req.pages,
                                 last, 0))
      chunked.append((req, start, c, len(work) - 1))
    s = self.sampler
    batch = scheduler.mixed_batch(work, self._settings, s.max_batch, self.pages_per_seq,
                                  self.min_bucket)
    version = s.policy_version
    self._announce("mixed", batch)
    toks, lps, top, routing = self.run_mixed(batch)
    self.stats["device_calls_total"] += 1
    self.stats["decode_steps_total"] += bool(decoding)
    toks, lps = np.asarray(toks), np.asarray(lps)
    want_routing = any(r.params.return_routing for r in self._order)
    routing = np.asarray(routing) if want_routing else None
    want_top = any(r.params.top_logprobs for r in self._order)
    top = (np.asarray(top[0]), np.asarray(top[1])) if want_top else None
    cu = batch["cu_q_lens"]
    for req, start, c, si in chunked:
      req.prefilled = start + c
      self.stats["prefill_tokens_total"] += c
      if routing is not None and req.params.return_routing:
        if req.routing_prompt is None:
          req.routing_prompt = self._new_routing(req)
        req.routing_prompt[start:start + c] = routing[cu[si]:cu[si] + c]
      self._register(req)
      if not self._prefilling(req):
        self.stats["prompt_tokens_total"] += len(req.prompt_ids)
    for si, w in enumerate(work):
      req = self._rows[w.row]
      if req is None or not w.sample:
        continue
      if w.counter > 0 and routing is not None and req.params.return_routing:
        req.routing_gen.append(routing[cu[si]].astype(np.int16))
      self._append(req, int(toks[si]), lps[:, si], version,
                   None if top is None else (top[0][si], top[1][:, si]))

  def _decode_state(self, reqs: list[Request]) -> dict[str, np.ndarray]:
    """The arrays of `decode_steps` (row s = engine row s) for running requests `reqs`."""
    b, k = self.sampler.max_batch, self.decode_steps
    tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
    counters, remaining = np.zeros(b, np.int32), np.zeros(b, np.int32)
    pages = np.zeros((b, self.pages_per_seq), np.int32)
    stops: list[frozenset[int]] = [frozenset()] * b
    for req in reqs:
      p, g = len(req.prompt_ids), len(req.token_ids)
      mt = req.params.max_tokens
      left = min(mt - g if mt is not None else self.sampler.max_len, self.sampler.max_len - p - g)
      pos = p + g - 1
      self._grow(req, pos + min(k, left) - 1)
      tokens[req.row], positions[req.row], counters[req.row] = req.token_ids[-1], pos, g
      remaining[req.row] = left
      pages[req.row] = scheduler.page_table(req.pages, self.pages_per_seq)
      stops[req.row] = req.stop_ids
    st = self._settings
    return dict(tokens=tokens, positions=positions, counters=counters, remaining=remaining,
                stop_ids=scheduler.stop_table(stops), page_indices=pages, temp=st.temperature,
                top_k=st.top_k, top_p=st.top_p, seeds=st.seed)

  def _multi_decode(self) -> None:
    """`decode_steps` decode iterations in one device call; the host replays them in order."""
    running = list(self._order)
    state = self._decode_state(running)
    version = self.sampler.policy_version
    self._announce("decode", state)
    toks, lps, top, routing = self.run_decode(state)
    self.stats["device_calls_total"] += 1
    toks, lps = np.asarray(toks), np.asarray(lps)
    routing = (np.asarray(routing) if any(r.params.return_routing for r in running) else None)
    top = ((np.asarray(top[0]), np.asarray(top[1]))
           if any(r.params.top_logprobs for r in running) else None)
    for i in range(self.decode_steps):
      live = [r for r in running if not r.done]
      if not live:
        break
      self.stats["decode_steps_total"] += 1
      for req in live:
        row = req.row
        if routing is not None and req.params.return_routing:
          req.routing_gen.append(routing[i, row].astype(np.int16))
        self._append(req, int(toks[i, row]), lps[i, :, row], version,
                     None if top is None else (top[0][i, row], top[1][i, :, row]))

  # ---- retirement ----------------------------------------------------------------------------

  def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
    if getattr(req, "pages", None) is not None:
      self._unclaim(req)
      self.alloc.release(req.pages)
      self._reserved -= req.reserved
      req.pages, req.reserved = None, 0
      if req in self._order:
        self._order.remove(req)
    super()._finish(req, reason, error)

  def _restore_routing_pages(self, req: Request) -> None:
    """Copies the cached blocks' recorded expert ids into a prefix-hit request's routing."""
    req.routing_prompt = self._new_routing(req)
    b = self.page_size
    for i, key in enumerate(req.keys[:req.hit_tokens // b]):
      block = self._routing_blocks.get(key)
      if block is not None:
        req.routing_prompt[i * b:(i + 1) * b] = block


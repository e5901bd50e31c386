"""Request scheduler over a Sampler: continuous (or static) batching, stops, streaming, hot swaps.

Each `step()` (1) applies a pending weight swap, (2) admits waiting requests into free cache rows
and prefills them, (3) runs one decode step for every running request, (4) retires finished ones.
With schedule="continuous" a request joins as soon as a row is free, so one long generation never
blocks short ones; schedule="static" admits only into an empty batch (the baseline the benchmark
compares against). A background thread (`start()`) drives steps for the server; `generate()`
drives them in the caller's thread for direct use. Every token carries the policy version of the
weights that produced it; a swap between steps leaves in-flight requests running on the new
weights (their earlier tokens keep the old version).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from klong_jax.inference.detok import IncrementalDetokenizer, StopMatcher
from klong_jax.inference.prefix_cache import PrefixCache
from klong_jax.inference.sampler import RowSettings, Sampler, SamplingParams
from klong_jax.inference.sampling import LOGPROB_MODES

log = logging.getLogger(__name__)
SCHEDULES = ("continuous", "static")


class ContextLengthError(ValueError):
  """The prompt (plus max_tokens) does not fit the served context."""


@dataclasses.dataclass
class TokenEvent:
  """One generated token, as streamed: id, logprob, weights version, and newly final text."""

  token_id: int
  logprob: float
  policy_version: int
  text: str
  top_logprobs: list[tuple[int, float]] | None = None  # (id, logprob), when requested.


@dataclasses.dataclass
class Completion:
  """A finished request. finish_reason: "stop" | "length" | "cancelled" | "error"."""

  prompt_ids: list[int]
  token_ids: list[int]
  logprobs: list[float]
  policy_versions: list[int]
  text: str
  finish_reason: str
  error: str | None = None
  top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  # Routing replay: expert ids [prompt + generated tokens, moe_layers, k] int16 (-1: none
  # recorded, e.g. the last generated token, which no step fed back), when requested.
  routing: np.ndarray | None = None
  cached_tokens: int = 0  # Prompt tokens served from the prefix cache (not prefilled).


class Request:
  """A submitted generation; `wait()` blocks until it is done and returns its Completion."""

  def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, seed: int,
               stop_ids: frozenset[int], on_event: Callable[[Any], None] | None,
               decode: Callable[[Sequence[int]], str] | None):
    self.id, self.prompt_ids, self.params, self.seed = rid, prompt_ids, params, seed
    self.stop_ids = stop_ids
    self.on_event = on_event
    self.token_ids: list[int] = []
    self.logprobs: list[float] = []
    self.versions: list[int] = []
    self.top_logprobs: list[list[tuple[int, float]]] = []
    self.routing_prompt: np.ndarray | None = None  # [prompt, moe_layers, k], set on prefill.
    self.routing_gen: list[np.ndarray] = []  # One [moe_layers, k] per generated token fed.
    self.detok = IncrementalDetokenizer(decode) if decode else None
    self.matcher = StopMatcher(params.stop)
    self.row = -1
    self.cached_tokens = 0
    self.pages: list[int] | None = None  # Paged engine: page table while admitted.
    self.cancelled = False
    self.submitted = time.monotonic()
    self.completion: Completion | None = None
    self._done = threading.Event()

  def wait(self, timeout: float | None = None) -> Completion:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.id} not done after {timeout}s")
    assert self.completion is not None
    return self.completion

  @property
  def done(self) -> bool:
    return self._done.is_set()


class Engine:
  """Schedules requests over one Sampler's cache rows; thread-safe `submit`."""

  def __init__(self, sampler: Sampler, tokenizer: Any = None, *, schedule: str = "continuous",
               stop_token_ids: Sequence[int] = (), seed: int = 0,
               prefix_cache: PrefixCache | None = None, replica_id: int | None = None):
    if schedule not in SCHEDULES:
      raise ValueError(f"schedule {schedule!r} not in {SCHEDULES}")
    self.sampler, self.tokenizer, self.schedule = sampler, tokenizer, schedule
    self.default_stop_ids = frozenset(int(t) for t in stop_token_ids)
    # Seeds of requests without one: a per-replica sequence (replica_id mixed in), so replicas
    # sharing a config do not sample alike; an explicit request seed still reproduces exactly.
    self._rng = np.random.default_rng(seed if replica_id is None else (seed, int(replica_id)))
    self._ids = itertools.count()
    self._lock = threading.Condition()
    self._waiting: collections.deque[Request] = collections.deque()
    self._rows: list[Request | None] = [None] * sampler.max_batch
    self._settings = RowSettings.empty(sampler.max_batch)
    self._pending_params: tuple[Any, int] | None = None
    self._thread: threading.Thread | None = None
    self._stop = False
    self.stats = collections.Counter()
    self.prefix_cache = prefix_cache  # None: every prompt is prefilled from position 0.
    # Expert ids of the prefix cache's blocks (routing replay), so a request that reuses a
    # cached prefix still returns routing for every prompt token.
    self._routing_blocks: dict[bytes, np.ndarray] = {}

  # ---- submission ----------------------------------------------------------------------------

  def check_fits(self, prompt_len: int, max_tokens: int | None) -> None:
    """Raises ContextLengthError when the prompt (+ max_tokens) exceeds the context."""
    limit = self.sampler.max_len
    if prompt_len < 1:
      raise ContextLengthError("the prompt is empty; send at least one token")
    if prompt_len + max(1, max_tokens or 0) > limit:
      raise ContextLengthError(
          f"this model's maximum context length is {limit} tokens; the request has "
          f"{prompt_len} prompt tokens and max_tokens={max_tokens}: shorten the prompt or lower "
          f"max_tokens")

  def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
             on_event: Callable[[Any], None] | None = None) -> Request:
    """Queues a request. `on_event` (called from the engine thread) gets each TokenEvent and
    finally the Completion."""
    params.validate()
    prompt = [int(t) for t in prompt_ids]
    self.check_fits(len(prompt), params.max_tokens)
    seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
    decode = self.tokenizer.decode if self.tokenizer is not None else None
    if params.stop and decode is None:
      raise ValueError("stop strings need a tokenizer; pass stop_token_ids instead")
    req = Request(next(self._ids), prompt, params, seed,
                  self.default_stop_ids | frozenset(params.stop_token_ids), on_event, decode)
    with self._lock:
      self._waiting.append(req)
      self.stats["requests_total"] += 1
      self._lock.notify_all()
    return req

  def cancel(self, req: Request) -> None:
    """Marks a request cancelled; its row is freed at the next step."""
    req.cancelled = True
    with self._lock:
      self._lock.notify_all()

  def set_params(self, params: Any, version: int) -> None:
    """Schedules a weight swap, applied between two steps (in-flight requests continue).

    `params`: the new weights, or a callable run there that loads them into the sampler itself.
    """
    with self._lock:
      self._pending_params = (params, int(version))
      self._lock.notify_all()

  def on_new_version(self, version: int) -> None:
    """Invalidates what the old weights computed: the prefix cache's blocks (keyed by version)."""
    if self.prefix_cache is not None:
      self.prefix_cache.clear(version)
      self._routing_blocks.clear()

  @property
  def policy_version(self) -> int:
    return self.sampler.policy_version

  def num_running(self) -> int:
    return sum(r is not None for r in self._rows)

  def num_waiting(self) -> int:
    return len(self._waiting)

  def has_work(self) -> bool:
    return bool(self._waiting) or self.num_running() > 0 or self._pending_params is not None

  # ---- scheduling ----------------------------------------------------------------------------

  def _swap_pending(self) -> None:
    """Applies a scheduled weight swap (between steps: in-flight requests continue)."""
    with self._lock:
      pending, self._pending_params = self._pending_params, None
    if pending is None:
      return
    params, version = pending
    self._before_swap(params, version)
    if callable(params):  # A loader (reload.swap_in_place): frees the old weights, loads.
      params()
    else:
      self.sampler.load_params(params, version)
    self.stats["reloads_total"] += 1
    self.on_new_version(version)
    log.info("serving policy version %d", version)

  def _before_swap(self, params: Any, version: int) -> None:
    """Hook run just before a scheduled swap is applied (multi-host: tell the followers)."""

  def step(self) -> None:
    """One scheduling iteration: swap weights, admit + prefill, decode, retire."""
    self._swap_pending()
    self._retire_cancelled()
    self._admit()
    self._decode()

  def _retire_cancelled(self) -> None:
    for req in [r for r in self._rows if r is not None and r.cancelled]:
      self._finish(req, "cancelled")
    with self._lock:
      dropped = [r for r in self._waiting if r.cancelled]
      self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
    for req in dropped:
      self._finish(req, "cancelled")

  def _free_rows(self) -> list[int]:
    """Rows a request may be admitted to now (static schedule: none until all are free)."""
    free = [i for i, r in enumerate(self._rows) if r is None]
    if self.schedule == "static" and len(free) < len(self._rows):
      return []
    return free

  def _seat(self, req: Request, row: int) -> None:
    """Puts `req` in cache row `row` with its sampling settings."""
    req.row = row
    self._rows[row] = req
    self._settings.set(row, req.params, req.seed)

  def _next_waiting(self, admitted: list[Request]) -> Request | None:
    """Pops the next waiting request that needs a row (caller holds the lock); those with
    nothing to generate go straight to `admitted` without one (they finish as "length")."""
    while self._waiting:
      req = self._waiting.popleft()
      if req.params.max_tokens != 0:
        return req
      admitted.append(req)
    return None

  def _admit(self) -> None:
    free = self._free_rows()
    admitted: list[Request] = []
    with self._lock:
      while free and (req := self._next_waiting(admitted)) is not None:
        self._seat(req, free.pop(0))
        admitted.append(req)
    for req in [r for r in admitted if r.row < 0]:
      self._finish(req, "length")
    pending = [r for r in admitted if r.row >= 0]
    while pending:  # One wave unless requests wait for a prefix another one is computing.
      wave, pending = self._plan_wave(pending)
      self._prefill(wave)

  def _prefill(self, wave: list[tuple[Request, int]]) -> None:
    """Prefills each (request, start) from `start` (slots before it already hold the cached
    prefix), stores the prompts' new blocks, and appends each first token."""
    groups: dict[int, list[tuple[Request, int]]] = collections.defaultdict(list)
    for req, start in wave:
      n = len(req.prompt_ids) - start
      groups[max(self.sampler.min_prefill_bucket, 1 << (n - 1).bit_length())].append((req, start))
    for entries in groups.values():
      reqs = [r for r, _ in entries]
      starts = [s for _, s in entries]
      version = self.sampler.policy_version
      toks, lps = self.sampler.prefill([r.row for r in reqs],
                                       [r.prompt_ids[s:] for r, s in entries],
                                       self._settings.take([r.row for r in reqs]), starts)
      prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
      self.stats["prompt_tokens_total"] += prompt_tokens
      self.stats["prefill_tokens_total"] += prompt_tokens - sum(starts)  # Computed, not reused.
      self._record_prefill_routing(entries)
      self._store_prefixes(reqs)
      top = self._top_logprobs(reqs)
      for j, req in enumerate(reqs):
        self._append(req, int(toks[j]), lps[:, j], version,
                     None if top is None else (top[0][j], top[1][:, j]))

  # ---- prefix caching ------------------------------------------------------------------------

  def _plan_wave(self, reqs: list[Request]) -> tuple[list[tuple[Request, int]], list[Request]]:
    """Restores each request's longest cached prefix into its row -> ([(req, start)], later).

    A request whose next uncached block another request of this wave will compute (e.g. the
    members of a group sharing a new prefix) waits for the next wave, to reuse it instead."""
    pc = self.prefix_cache
    if pc is None:
      return [(r, 0) for r in reqs], []
    if pc.version != self.sampler.policy_version:  # Weights loaded behind the engine's back.
      pc.clear(self.sampler.policy_version)
      self._routing_blocks.clear()
    wave, later, claimed = [], [], set()
    for req in reqs:
      keys = pc.keys(req.prompt_ids)
      ids = pc.lookup(keys, len(req.prompt_ids))
      if len(ids) < len(keys) and keys[len(ids)] in claimed:
        later.append(req)
        continue
      claimed.update(keys[len(ids):])
      if ids:
        self.sampler.cache = pc.restore(self.sampler.cache, req.row, ids)
      start = len(ids) * pc.block_size
      if req.params.return_routing:
        self._restore_routing(req, keys[:len(ids)])
      self.stats["prefix_cache_hit_tokens_total"] += start
      req.cached_tokens = start
      wave.append((req, start))
    return wave, later

  def _store_prefixes(self, reqs: list[Request]) -> None:
    """Copies the full prompt blocks of freshly prefilled rows into the prefix cache."""
    pc = self.prefix_cache
    if pc is None:
      return
    evicted = pc.index.evictions
    for req in reqs:
      keys = pc.keys(req.prompt_ids)
      self.stats["prefix_cache_stored_blocks_total"] += pc.store(self.sampler.cache, req.row, keys)
      if req.routing_prompt is not None:
        b = pc.block_size
        for i, key in enumerate(keys):
          if key in pc.index:
            self._routing_blocks.setdefault(key, req.routing_prompt[i * b:(i + 1) * b].copy())
    self.stats["prefix_cache_evicted_blocks_total"] += pc.index.evictions - evicted
    if len(self._routing_blocks) > len(pc.index):  # Drop the routing of evicted blocks.
      self._routing_blocks = {k: v for k, v in self._routing_blocks.items() if k in pc.index}

  # ---- routing replay ------------------------------------------------------------------------

  def _new_routing(self, req: Request) -> np.ndarray:
    """An all-missing (-1) [prompt, moe_layers, k] int16 routing buffer for `req`."""
    cfg = self.sampler.model_cfg
    layers = cfg.num_moe_layers if cfg is not None else 0
    k = cfg.num_experts_per_tok if cfg is not None else 0
    return np.full((len(req.prompt_ids), layers, k), -1, np.int16)

  def _restore_routing(self, req: Request, keys: Sequence[bytes]) -> None:
    """Copies the cached blocks' recorded expert ids into the request's prompt routing."""
    req.routing_prompt = self._new_routing(req)
    b = self.prefix_cache.block_size if self.prefix_cache is not None else 0
    for i, key in enumerate(keys):
      block = self._routing_blocks.get(key)
      if block is not None:
        req.routing_prompt[i * b:(i + 1) * b] = block

  def _record_prefill_routing(self, entries: list[tuple[Request, int]]) -> None:
    """Stores the prefilled prompt tokens' expert ids in the requests that asked for them (the
    device-to-host copy happens only then; their cached blocks keep the ids)."""
    if self.sampler.routing is None or not any(r.params.return_routing for r, _ in entries):
      return
    routing = np.asarray(self.sampler.routing)
    for j, (req, start) in enumerate(entries):
      if not req.params.return_routing:
        continue
      if req.routing_prompt is None:
        req.routing_prompt = self._new_routing(req)
      n = len(req.prompt_ids) - start
      req.routing_prompt[start:start + n] = routing[j, :n]

  def _decode(self) -> None:
    running = [r for r in self._rows if r is not None]
    if not running:
      return
    b = self.sampler.max_batch
    tokens = np.zeros(b, np.int32)
    positions = np.full(b, self.sampler.max_len - 1, np.int32)
    counters = np.zeros(b, np.int32)
    for req in running:
      tokens[req.row] = req.token_ids[-1]
      positions[req.row] = len(req.prompt_ids) + len(req.token_ids) - 1
      counters[req.row] = len(req.token_ids)
    version = self.sampler.policy_version
    toks, lps = self.sampler.decode(tokens, positions, self._settings, counters)
    self.stats["decode_steps_total"] += 1
    if self.sampler.routing is not None and any(r.params.return_routing for r in running):
      routing = np.asarray(self.sampler.routing)  # The fed tokens' (token_ids[-1]) expert ids.
      for req in running:
        if req.params.return_routing:
          req.routing_gen.append(routing[req.row].astype(np.int16))
    top = self._top_logprobs(running)
    for req in running:
      self._append(req, int(toks[req.row]), lps[:, req.row], version,
                   None if top is None else (top[0][req.row], top[1][:, req.row]))

  def _top_logprobs(self, reqs: list[Request]) -> tuple[np.ndarray, np.ndarray] | None:
    """The sampler's last alternatives as numpy, fetched only when a request asks for them."""
    if not any(r.params.top_logprobs for r in reqs) or self.sampler.top_logprobs is None:
      return None
    ids, lps = self.sampler.top_logprobs
    return np.asarray(ids), np.asarray(lps)

  def _append(self, req: Request, token: int, lps: np.ndarray, version: int,
              top: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Records one sampled token, emits it, and finishes the request on a stop or a limit."""
    mode = LOGPROB_MODES.index(req.params.logprob_mode)
    logprob = float(lps[mode])
    req.token_ids.append(token)
    req.logprobs.append(logprob)
    req.versions.append(version)
    alts = None
    if top is not None and req.params.top_logprobs:
      n = req.params.top_logprobs
      alts = list(zip(top[0][:n].tolist(), top[1][mode, :n].tolist(), strict=True))
      req.top_logprobs.append(alts)
    self.stats["generated_tokens_total"] += 1
    is_stop_id = token in req.stop_ids
    text = ""
    if req.detok is not None and not is_stop_id:
      text = req.matcher.feed(req.detok.push(token))
    if req.on_event is not None:
      req.on_event(TokenEvent(token, logprob, version, text, alts))
    if is_stop_id or req.matcher.stopped:
      self._finish(req, "stop")
    elif req.params.max_tokens is not None and len(req.token_ids) >= req.params.max_tokens:
      self._finish(req, "length")
    elif len(req.prompt_ids) + len(req.token_ids) >= self.sampler.max_len:
      self._finish(req, "length")

  def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
    if req.row >= 0:
      self._rows[req.row] = None
      req.row = -1
    if req.done:
      return
    tail = ""
    if req.detok is not None and not req.matcher.stopped:  # Text held back by the detokenizer.
      tail = req.matcher.feed(req.detok.flush())
      reason = "stop" if req.matcher.stopped and reason == "length" else reason
    tail += req.matcher.flush()
    if tail and req.on_event is not None:
      req.on_event(TokenEvent(-1, 0.0, self.sampler.policy_version, tail))
    req.completion = Completion(req.prompt_ids, req.token_ids, req.logprobs, req.versions,
                                req.matcher.text, reason, error, req.top_logprobs,
                                self._completion_routing(req), req.cached_tokens)
    self.stats[f"finished_{reason}_total"] += 1
    req._done.set()
    if req.on_event is not None:
      req.on_event(req.completion)

  def _completion_routing(self, req: Request) -> np.ndarray | None:
    """[prompt + generated, moe_layers, k] int16 expert ids of a request that asked for them."""
    if not req.params.return_routing:
      return None
    prompt = req.routing_prompt if req.routing_prompt is not None else self._new_routing(req)
    gen = np.full((len(req.token_ids), *prompt.shape[1:]), -1, np.int16)
    if req.routing_gen:
      gen[:len(req.routing_gen)] = np.stack(req.routing_gen[:len(req.token_ids)])
    return np.concatenate([prompt, gen])

  def _fail_all(self, error: str) -> None:
    for req in [r for r in self._rows if r is not None]:
      self._finish(req, "error", error)

  # ---- drivers -------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
    """Runs `prompts` to completion (in this thread unless the background loop is running)."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist, strict=True)]
    if self._thread is None:
      while not all(r.done for r in reqs):
        self.step()
    return [r.wait() for r in reqs]

  def start(self) -> None:
    """Starts the background scheduling thread (idempotent)."""
    if self._thread is not None:
      return
    self._stop = False
    self._thread = threading.Thread(target=self._loop, name="klong-engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    if self._thread is None:
      return
    with self._lock:
      self._stop = True
      self._lock.notify_all()
    self._thread.join()
    self._thread = None

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._stop and not self.has_work():
          self._lock.wait()
        if self._stop:
          return
      try:
        self.step()
      except Exception as e:  # Keep serving: fail the running batch, not the server.
        log.exception("engine step failed")
        self.stats["step_errors_total"] += 1
        self._fail_all(f"{type(e).__name__}: {e}")

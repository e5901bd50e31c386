"""Batched JAX sampler: preallocated KV cache rows, jitted prefill and decode, swappable weights.

The cache has `max_batch` rows of `max_len` slots. A request owns one row while it runs: `prefill`
writes its prompt at positions 0..n-1 (the model writes K/V at slot = position and a query at p
attends to slots <= p, so stale data left in the row by an earlier request is never read) and
samples its first token; `decode` advances every row by one token. Rows that are idle, and padding
tokens, are written at the last slot `max_len - 1`, which a live row only reads in the very step
that writes it. So requests can join and leave between decode steps (continuous batching, see
engine.py) without touching other rows.

Weights (all non-RNG nnx variables) are held as a state separate from the graph, so
`load_params` swaps them (hot reload) without recompiling; every sampled token is stamped with
`policy_version`.
Sampling and logprob conventions: sampling.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klong_jax.inference import sampling, weight_layout
from klong_jax.model import precision

TOP_LOGPROBS = 20  # Alternatives computed per sampled token (OpenAI's top_logprobs maximum).


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 = greedy; top_k 0 / top_p 1 = disabled."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_tokens: int | None = None  # None: until a stop or the context is full.
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()  # Stop strings (checked on the detokenized text).
  seed: int | None = None  # None: drawn by the engine.
  logprob_mode: str = "tempered"  # See sampling.py: "tempered" | "raw" | "processed".
  top_logprobs: int = 0  # Likeliest alternatives to report per token (0..TOP_LOGPROBS).
  # Routing replay (R3): record the MoE expert ids of every prompt and generated token.
  return_routing: bool = False

  def validate(self) -> SamplingParams:
    """Raises ValueError naming the bad field; returns self."""
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if self.max_tokens is not None and self.max_tokens < 0:
      raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
    if not 0 <= self.top_logprobs <= TOP_LOGPROBS:
      raise ValueError(f"top_logprobs must be in [0, {TOP_LOGPROBS}], got {self.top_logprobs}")
    if self.logprob_mode not in sampling.LOGPROB_MODES:
      raise ValueError(f"logprob_mode {self.logprob_mode!r} not in {sampling.LOGPROB_MODES}")
    return self


@dataclasses.dataclass
class RowSettings:
  """Host-side per-row sampling settings, as numpy arrays fed to the jitted functions."""

  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  seed: np.ndarray

  @classmethod
  def empty(cls, n: int) -> RowSettings:
    return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
               np.zeros(n, np.uint32))

  def set(self, i: int, sp: SamplingParams, seed: int) -> None:
    self.temperature[i] = sp.temperature
    self.top_k[i] = sp.top_k
    self.top_p[i] = sp.top_p
    self.seed[i] = seed % (2**32)

  def take(self, idx: Sequence[int]) -> RowSettings:
    idx = np.asarray(idx)
    return RowSettings(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.seed[idx])


def _bucket(n: int, minimum: int, maximum: int) -> int:
  """Smallest power of two >= n (at least `minimum`, at most `maximum`) to bound recompiles."""
  return min(maximum, max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def _cache_batch_axes(model: Any, dtype: Any) -> Any:
  """The batch axis of every KV-cache leaf, found by comparing abstract caches of batch 1 and 2."""
  one = jax.eval_shape(lambda: model.init_cache(batch=1, max_len=8, dtype=dtype))
  two = jax.eval_shape(lambda: model.init_cache(batch=2, max_len=8, dtype=dtype))

  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
    if len(diff) != 1:
      raise ValueError(f"cannot find the batch axis of a KV-cache leaf {a.shape} vs {b.shape}")
    return diff[0]

  return jax.tree.map(axis, one, two)


def _take_rows(x: jax.Array, rows: jax.Array, axis: int) -> jax.Array:
  return jnp.take(x, rows, axis=axis)


def _put_rows(x: jax.Array, sub: jax.Array, rows: jax.Array, axis: int) -> jax.Array:
  index = (slice(None),) * axis + (rows,)
  return x.at[index].set(sub.astype(x.dtype))


def _top_logprobs(logits: jax.Array, temp: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The TOP_LOGPROBS likeliest tokens per row -> (ids [B, K], logprobs [3, B, K]) in
  LOGPROB_MODES order, so OpenAI `top_logprobs` follow the request's logprob_mode."""
  logits = logits.astype(jnp.float32)
  greedy = temp <= 0.0
  scaled = logits / jnp.where(greedy, 1.0, temp)[:, None]
  _, ids = jax.lax.top_k(logits, min(TOP_LOGPROBS, logits.shape[-1]))  # Same order for any T.
  filtered = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)),
                          lambda s: sampling.filter_logits(s, top_k, top_p), lambda s: s, scaled)

  def pick(x: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), ids, axis=-1)

  point = jnp.where(jnp.arange(ids.shape[-1]) == 0, 0.0, -jnp.inf)  # Greedy: all mass on top-1.
  processed = jnp.where(greedy[:, None], point[None], pick(filtered))
  return ids.astype(jnp.int32), jnp.stack([pick(scaled), pick(logits), processed])


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _prefill_step(graphdef, axes_def, params, rest, cache, tokens, positions, rows, last, temp,
                  top_k, top_p, seeds):
  """Prefill rows `rows` of the cache with `tokens` and sample each row's first token."""
  model = nnx.merge(graphdef, params, rest)
  axes = jax.tree.unflatten(axes_def[0], axes_def[1])
  sub = jax.tree.map(lambda x, ax: _take_rows(x, rows, ax), cache, axes)
  logits, sub, routing = model.decode(tokens, positions, sub, with_routing=True)
  cache = jax.tree.map(lambda x, s, ax: _put_rows(x, s, rows, ax), cache, sub, axes)
  last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  counters = jnp.zeros_like(seeds, dtype=jnp.int32)
  toks, lps = sampling.sample(last_logits, temp, top_k, top_p, seeds, counters)
  return toks, lps, _top_logprobs(last_logits, temp, top_k, top_p), routing, cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _decode_step(graphdef, params, rest, cache, tokens, positions, temp, top_k, top_p, seeds,
                 counters):
  """Feed one token per row and sample the next (all rows)."""
  model = nnx.merge(graphdef, params, rest)
  logits, cache, routing = model.decode(tokens[:, None], positions[:, None], cache,
                                        with_routing=True)
  toks, lps = sampling.sample(logits[:, 0], temp, top_k, top_p, seeds, counters)
  return toks, lps, _top_logprobs(logits[:, 0], temp, top_k, top_p), routing[:, 0], cache


class Sampler:
  """Owns the weights, the KV cache and the compiled prefill/decode steps for one model."""

  def __init__(self, model: nnx.Module, *, max_batch: int, max_len: int, mesh: Any = None,
               rules: Any = None, cache_dtype: Any = jnp.float32, policy_version: int = 0,
               min_prefill_bucket: int = 16, min_prefill_rows: int = 1,
               dense_cache: bool = True):
    if max_batch < 1 or max_len < 2:
      raise ValueError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
    self.max_batch, self.max_len = max_batch, max_len
    self.mesh, self.rules = mesh, rules
    self.cache_dtype = cache_dtype
    self.min_prefill_bucket = min_prefill_bucket
    self.min_prefill_rows = min(min_prefill_rows, max_batch)
    self.policy_version = policy_version
    # (ids [rows, K], logprobs [3, rows, K]) of the last prefill/decode, left on device.
    self.top_logprobs: tuple[jax.Array, jax.Array] | None = None
    # MoE expert ids the last step's input tokens used, left on device (routing replay):
    # prefill [rows, T, moe_layers, k], decode [B, moe_layers, k].
    self.routing: jax.Array | None = None
    self.model_cfg = getattr(model, "cfg", None)  # MoE shape of the recorded routing.
    # All variables but RNG state are weights: nnx Params and e.g. the MoE router's expert bias.
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Not(nnx.RngState), ...)
    # The trainer's compute-dtype policy (model/precision.py): matmul weights in the model's
    # compute dtype, router / expert bias / norms / biases fp32, so both compute the same
    # routing and logprobs; later loads (load_params) are cast to these dtypes.
    if self.model_cfg is not None:
      self.params = precision.cast_params(self.params, self.model_cfg.dtype)
    # Committed to their shardings, as `load_params` leaves them: jit keys its cache on
    # committedness, so uncommitted initial weights made the first swap recompile every step.
    # Weights in the layout the steps read (row-major where TPU's default is not; a no-op off
    # TPU; inference/weight_layout.py): jit compiles for a committed argument's layout.
    self.params = weight_layout.place_tree(self.params)
    self.rest = jax.tree.map(
        lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x, self.rest)
    self._batch_axes = _cache_batch_axes(model, cache_dtype)
    one = jnp.zeros((1, 1), jnp.int32)
    self.vocab_size = int(jax.eval_shape(lambda: model(one, one)[0]).shape[-1])
    # dense_cache=False: no [L, max_batch, max_len] cache (the paged engine keeps its own pool;
    # prefill/decode here then cannot run).
    self.cache = None
    if dense_cache:
      with self._context():
        self.cache = self._make_cache()
    leaves, treedef = jax.tree.flatten(self._batch_axes)
    self._axes_def = (treedef, tuple(leaves))  # Hashable: a static jit argument.

  # ---- weights -------------------------------------------------------------------------------

  def load_params(self, params: Any, version: int) -> None:
    """Swaps in new weights stamped `version`; same shapes and shardings, so no recompilation.

    `params` is an nnx State or a pure dict (e.g. restored from a policy checkpoint) of all the
    model's variables (Params and the router's expert bias), or a subset such as Params only, in
    which case the other variables keep their current values.
    """
    if isinstance(params, nnx.State):
      params = params.to_pure_dict()
    target = self.params
    new = jax.tree.map(lambda x: x, target)
    try:
      new.replace_by_pure_dict(params)
    except (ValueError, KeyError) as e:
      raise ValueError(f"policy {version}: parameter tree does not match the served model: "
                       f"{e}") from e
    for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(new), strict=True):
      if a.shape != jnp.shape(b):
        raise ValueError(f"policy {version}: parameter shape {jnp.shape(b)} != served {a.shape}")
    self.params = jax.tree.map(lambda b, a: weight_layout.place(jnp.asarray(b, a.dtype),
                                                                a.sharding), new, target)
    self.policy_version = int(version)

  def model(self) -> nnx.Module:
    """The model with the current weights (for full-forward checks)."""
    return nnx.merge(self.graphdef, self.params, self.rest)

  # ---- jitted steps --------------------------------------------------------------------------

  def _context(self):
    """Mesh + logical rules context under which the model is traced (a no-op without a mesh)."""
    import contextlib
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      if self.rules is not None:
        stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  def _make_cache(self) -> Any:
    model = self.model()
    make = lambda: model.init_cache(batch=self.max_batch, max_len=self.max_len,
                                    dtype=self.cache_dtype)
    if self.mesh is None:
      return jax.jit(make)()
    from jax.sharding import NamedSharding, PartitionSpec

    from klong_jax.parallel import rules as rules_lib
    rules = self.rules if self.rules is not None else rules_lib.LOGICAL_RULES
    batch_axes = rules_lib.batch_sharding(self.mesh, rules).spec[0]
    size = int(np.prod([self.mesh.shape[a] for a in (
        (batch_axes,) if isinstance(batch_axes, str) else batch_axes or ())]))
    batch_spec = batch_axes if self.max_batch % size == 0 else None
    kv_spec = rules_lib.activation_sharding(self.mesh, ("act_kv_heads",), rules).spec[0]
    kv_size = self.mesh.shape[kv_spec] if isinstance(kv_spec, str) else 1
    abstract = jax.eval_shape(make)

    def sharding(leaf, axis):
      # Batch over the act_batch axes; for the [layers, B, S, kv_heads, head_dim] layout, kv
      # heads over the act_kv_heads axis (like the attention activations).
      spec = [None] * leaf.ndim
      spec[axis] = batch_spec
      if leaf.ndim == 5 and axis == 1 and leaf.shape[3] % kv_size == 0:
        spec[3] = kv_spec
      return NamedSharding(self.mesh, PartitionSpec(*spec))

    return jax.jit(make, out_shardings=jax.tree.map(sharding, abstract, self._batch_axes))()

  # ---- public steps --------------------------------------------------------------------------

  def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
              settings: RowSettings, starts: Sequence[int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Writes each prompt into its cache row from position `starts[i]` (default 0) and samples
    its first token.

    With a nonzero start, `prompts[i]` is the suffix after a prefix whose K/V the row already
    holds at slots 0..start-1 (prefix caching). `settings` holds one entry per prompt. Returns
    (tokens [k], logprobs [3, k]) as numpy; `self.top_logprobs` then holds each entry's
    alternatives and `self.routing` the prompt tokens' expert ids (entries past k and tokens past
    each prompt are padding). Prompts are padded to a power-of-two length and
    count to bound recompilation.
    """
    k = len(rows)
    starts = [0] * k if starts is None else [int(s) for s in starts]
    if k == 0 or k != len(prompts) or k != len(starts):
      raise ValueError(f"prefill needs one prompt per row, got {len(prompts)} for {k} rows")
    longest = max(len(p) for p in prompts)
    end = max(s + len(p) for s, p in zip(starts, prompts, strict=True))
    if min(len(p) for p in prompts) < 1 or min(starts) < 0 or end >= self.max_len:
      raise ValueError(f"prompt lengths must be in [1, {self.max_len - 1}], longest is {longest}"
                       f" (ending at position {end})")
    t = _bucket(longest, self.min_prefill_bucket, self.max_len)
    kb = _bucket(k, self.min_prefill_rows, self.max_batch)
    pad = self.max_len - 1
    tokens = np.zeros((kb, t), np.int32)
    positions = np.full((kb, t), pad, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      positions[i, :len(p)] = np.arange(starts[i], starts[i] + len(p))
    idx = list(range(k)) + [0] * (kb - k)  # Padding entries repeat entry 0 exactly.
    tokens, positions = tokens[idx], positions[idx]
    row_ids = np.asarray([rows[i] for i in idx], np.int32)
    last = np.asarray([len(prompts[i]) - 1 for i in idx], np.int32)
    s = settings.take(idx)
    with self._context():
      toks, lps, self.top_logprobs, self.routing, self.cache = _prefill_step(
          self.graphdef, self._axes_def, self.params, self.rest, self.cache, tokens, positions,
          row_ids, last, s.temperature, s.top_k, s.top_p, s.seed)
    return np.asarray(toks)[:k], np.asarray(lps)[:, :k]

  def decode(self, tokens: np.ndarray, positions: np.ndarray, settings: RowSettings,
             counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One decode step for all rows: feeds tokens [B] at positions [B], samples the next ones.

    Idle rows should pass position max_len - 1. Returns (tokens [B], logprobs [3, B]) as numpy;
    `self.top_logprobs` then holds each row's alternatives and `self.routing` the expert ids
    of the tokens fed.
    """
    with self._context():
      toks, lps, self.top_logprobs, self.routing, self.cache = _decode_step(
          self.graphdef, self.params, self.rest, self.cache, np.asarray(tokens, np.int32),
          np.asarray(positions, np.int32), settings.temperature, settings.top_k, settings.top_p,
          settings.seed, np.asarray(counters, np.int32))
    return np.asarray(toks), np.asarray(lps)

"""Serving plan: will this model + serving mesh + cache fit a TPU slice? Compiles the real steps.

  python -m klong_jax.launch.plan --config=configs/serve_glm45_air.py:slice=v5p-8 \
      --topology=v5p-8 --step=serve [--prefill_len=1024] [--engine=paged] [--out=plan.json]

Builds the served model abstractly (bf16 weights under the dtype policy, laid out by the config's
rules, e.g. parallel/rules.SERVING_RULES), the engine's KV cache (the `serve` section's max_batch
x max_len in cache_dtype) and lowers the engine's decode step and one prefill chunk with those
shardings; with `--topology` the TPU compiler (libtpu, no TPU needed) compiles them. Per chip it
reports weights + KV cache (exact, from the shardings), the compiler's temporaries, the peak vs
HBM (FITS / DOES NOT FIT, or the compiler's own refusal), the collectives of each step's HLO by
kind, the all-gathers whose result is an expert weight (there must be none: experts stay on
their `expert` shard and tokens travel instead), and the per-call copies of whole arguments (a
weight relaid out on every call; the abstract params carry the Sampler's device layout,
inference/weight_layout.py, so there should be none of the expert stacks).

An engine is a pair of step builders (`ENGINES`): a function from a `ServeSetup` to the
`ServeStep` it compiles (jitted function + abstract arguments + persistent bytes). "dense" is
today's Sampler (inference/sampler.py `_decode_step` / `_prefill_step`, one [L, B, max_len] cache
block); "paged" is inference/paged (decode = one `decode_steps` call of serve.decode_steps
iterations, prefill = one `mixed_step` of serve.token_budget tokens, over a page pool of
serve.kv_pages pages, default max_batch full rows + prefix_cache_mb, laid out by
parallel/rules.paged_pool_spec). `--engine` picks one; default: the config's serve.engine.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from klong_jax.launch import checks
from klong_jax.launch import tpu_topology as topo_lib

GIB = float(1 << 30)
_FAKE_CPU = "CPU, fake devices"


@dataclasses.dataclass
class ServeSetup:
  """What a step builder needs: the model (abstract, sharded), mesh, rules and cache size."""

  model_cfg: Any
  mesh: Any
  rules: tuple
  max_batch: int
  max_len: int
  cache_dtype: Any
  prefill_len: int
  # Paged engine (serve section): pages of `page_size` tokens, `num_pages` in the pool, a mixed
  # step of `token_budget` tokens, `decode_steps` iterations per decode call.
  page_size: int = 16
  num_pages: int = 0
  token_budget: int = 256
  decode_steps: int = 4
  paged_attention: str = "auto"
  min_bucket: int = 16  # plan_serve passes paged/scheduler.MIN_BUCKET (the engine's).
  graphdef: Any = None
  params: Any = None  # nnx.State of ShapeDtypeStructs (policy dtypes, serving shardings).
  rest: Any = None  # RNG state (abstract).
  model: Any = None  # The abstract module (for init_cache / shapes).


@dataclasses.dataclass
class ServeStep:
  """One engine step to compile: `jitted.lower(*args)`, and its persistent per-chip bytes."""

  name: str  # "decode" or "prefill".
  jitted: Any
  args: tuple
  weights: float
  kv_cache: float
  tokens: str  # What one call processes, for the report ("32 rows x 1 token").
  kwargs: dict = dataclasses.field(default_factory=dict)  # Static keyword arguments of `jitted`.
  notes: tuple[str, ...] = ()  # Printed under the figures (e.g. how the page pool is laid out).


StepBuilder = Callable[[ServeSetup], ServeStep]


@dataclasses.dataclass(frozen=True)
class ServePlan(checks.MemoryVerdict):
  """Per-chip figures (bytes) of one compiled serving step, and whether it fits."""

  step: str
  mesh: dict[str, int]
  max_batch: int
  max_len: int
  tokens: str
  weights: float
  kv_cache: float
  arguments: float = 0.0
  temp: float = 0.0
  output_not_aliased: float = 0.0
  hbm: float | None = None
  device: str = _FAKE_CPU
  compile_seconds: float = 0.0
  collectives: Mapping[str, topo_lib.Collective] = dataclasses.field(default_factory=dict)
  expert_gathers: tuple[str, ...] = ()  # All-gather results shaped like expert weights.
  refused: str = ""
  required: float | None = None
  engine: str = "dense"
  notes: tuple[str, ...] = ()
  kernels: Mapping[str, int] = dataclasses.field(default_factory=dict)  # TPU custom calls.
  # Copies of whole arguments (weights relaid out every call) in the compiled entry computation.
  argument_copies: tuple[str, ...] = ()

  @property
  def persistent(self) -> float:
    return self.weights + self.kv_cache

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready figures (bytes, seconds) and the verdict, for benchmarks/results/tpu_plans."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "collectives"}
    out.update(peak=self.peak, fits=self.fits, kernels=dict(self.kernels),
               expert_gathers=list(self.expert_gathers), notes=list(self.notes),
               argument_copies=list(self.argument_copies), collectives={
                   k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else str(v)
                   for k, v in self.collectives.items()})
    return out

  def report(self) -> str:
    mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items() if v != 1) or "single device"
    lines = [f"plan (SERVE {self.engine} {self.step} step on {self.device}): mesh {mesh} "
             f"({math.prod(self.mesh.values())} chips), cache {self.max_batch} rows x "
             f"{self.max_len} tokens, one call = {self.tokens}",
             f"  {'per-chip memory':32s} {'GiB':>9s}",
             f"  {'weights':32s} {self.weights / GIB:9.3f}",
             f"  {'KV page pool' if self.engine == 'paged' else 'KV cache':32s} "
             f"{self.kv_cache / GIB:9.3f}"]
    if self.refused:
      need = "" if self.required is None else f" ({self.required / GIB:.1f} GiB)"
      lines.append(f"  the TPU compiler refused{need}: {self.refused}")
    else:
      lines += [f"  {'temporaries (compiler)':32s} {self.temp / GIB:9.3f}",
                f"  {'outputs not aliased':32s} {self.output_not_aliased / GIB:9.3f}",
                f"  {'peak':32s} {self.peak / GIB:9.3f}"]
      if abs(self.arguments - self.weights - self.kv_cache) > 0.02 * self.arguments:
        lines.append(f"  note: the compiler counts {self.arguments / GIB:.3f} GiB of inputs")
    if (verdict := self.verdict_line(hbm_digits=2)) is not None:
      lines.append(verdict)
    lines += [f"  {n}" for n in self.notes]
    if self.device != _FAKE_CPU and not self.refused:
      lines += topo_lib.collectives_table(dict(self.collectives))
      kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items())) or "none"
      lines.append(f"  Pallas/Mosaic kernels: {kernels}")
      gathers = ", ".join(self.expert_gathers[:4]) or "none"
      lines.append(f"  all-gathers of expert weights: {gathers}")
      copies = ", ".join(self.argument_copies[:6]) or "none"
      more = f" (+{len(self.argument_copies) - 6} more)" if len(self.argument_copies) > 6 else ""
      lines.append(f"  per-call copies of whole arguments (relayouts): {copies}{more}")
    lines.append(f"  compile time {self.compile_seconds:.1f} s")
    return "\n".join(lines)


def _replicated(mesh: Any) -> Any:
  import jax
  return jax.sharding.NamedSharding(mesh, jax.P())


def _bytes(tree: Any) -> float:
  """Per-chip bytes of a tree of ShapeDtypeStructs carrying shardings."""
  import jax
  import numpy as np
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def abstract_serving_model(setup: ServeSetup) -> ServeSetup:
  """Fills graphdef / params / rest / model: the served model's variables as ShapeDtypeStructs
  in the dtype policy (model/precision.py, as the Sampler casts them) with serving shardings and
  the Sampler's device layout (row-major on TPU, inference/weight_layout.py)."""
  import jax
  from flax import nnx

  from klong_jax.inference import weight_layout
  from klong_jax.model import precision
  from klong_jax.model.transformer import Transformer
  from klong_jax.parallel import rules as rules_lib

  cfg, mesh = setup.model_cfg, setup.mesh
  rules_lib.check_divisible(cfg, mesh, setup.rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(setup.rules):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Not(nnx.RngState), ...)
    shardings = nnx.get_named_sharding(params, mesh)

  def leaf(path, x, s):  # In the layout the Sampler places them in (inference/weight_layout).
    return weight_layout.abstract(x.shape, precision.leaf_dtype(path, x.dtype, cfg.dtype), s)

  setup.params = jax.tree_util.tree_map_with_path(leaf, params, shardings)
  setup.rest = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated(mesh)), rest)
  setup.graphdef, setup.model = graphdef, model
  return setup


def layout_notes(params: Any) -> tuple[str, ...]:
  """A line when TPU's tiles pad the served weights by over 1% (weight_layout.laid_out_bytes:
  row-major weights whose per-chip last dim is not a multiple of 128), naming the weight padded
  most: the compiler counts those bytes, not the shapes' (empty off TPU: nothing is padded)."""
  import jax

  from klong_jax.inference import weight_layout
  leaves = jax.tree_util.tree_leaves_with_path(params)
  pads = [(weight_layout.laid_out_bytes(x.shape, x.dtype, x.sharding) - _bytes(x), path, x)
          for path, x in leaves]
  extra = sum(p for p, _, _ in pads)
  if extra <= 0.01 * _bytes(params):
    return ()
  pad, path, x = max(pads, key=lambda t: t[0])
  local = x.sharding.shard_shape(x.shape)
  return (f"weights as TPU lays them out: {(_bytes(params) + extra) / GIB:.3f} GiB per chip "
          f"(+{extra / GIB:.3f}: row-major weights' last dim padded to 128 lanes; most in "
          f"{jax.tree_util.keystr(path)} {list(local)} per chip, +{pad / GIB:.3f})",)


def _dense_cache(setup: ServeSetup) -> tuple[Any, Any]:
  """(abstract KV cache with the Sampler's shardings, its batch axes)."""
  import jax

  from klong_jax.inference import sampler as sampler_lib
  from klong_jax.parallel import rules as rules_lib

  model = setup.model
  axes = sampler_lib._cache_batch_axes(model, setup.cache_dtype)
  shapes = jax.eval_shape(lambda: model.init_cache(batch=setup.max_batch, max_len=setup.max_len,
                                                   dtype=setup.cache_dtype))
  cache = jax.tree.map(lambda x, ax: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=rules_lib.kv_cache_sharding(setup.mesh, setup.rules, x.shape,
                                                             ax)), shapes, axes)
  return cache, axes


def _rows(setup: ServeSetup, n: int, dtype: Any, sharded: bool) -> Any:
  import jax

  from klong_jax.parallel import rules as rules_lib
  spec = rules_lib.batch_sharding(setup.mesh, setup.rules).spec[0] if sharded else None
  return jax.ShapeDtypeStruct((n,), dtype, sharding=jax.sharding.NamedSharding(
      setup.mesh, jax.P(spec)))


def dense_decode(setup: ServeSetup) -> ServeStep:
  """Today's Sampler decode step: one token for every cache row (sampler._decode_step)."""
  import jax.numpy as jnp

  from klong_jax.inference import sampler as sampler_lib

  cache, _ = _dense_cache(setup)
  b = setup.max_batch
  rows = lambda dt: _rows(setup, b, dt, True)  # noqa: E731
  args = (setup.graphdef, setup.params, setup.rest, cache, rows(jnp.int32), rows(jnp.int32),
          rows(jnp.float32), rows(jnp.int32), rows(jnp.float32), rows(jnp.uint32),
          rows(jnp.int32))
  return ServeStep("decode", sampler_lib._decode_step, args, _bytes(setup.params),
                   _bytes(cache), f"{b} rows x 1 token")


def dense_prefill(setup: ServeSetup) -> ServeStep:
  """Today's Sampler prefill of one row: `prefill_len` prompt tokens into the cache."""
  import jax
  import jax.numpy as jnp

  from klong_jax.inference import sampler as sampler_lib

  cache, axes = _dense_cache(setup)
  leaves, treedef = jax.tree.flatten(axes)
  t, rep = setup.prefill_len, _replicated(setup.mesh)
  tok = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=rep)
  one = lambda dt: _rows(setup, 1, dt, False)  # noqa: E731
  args = (setup.graphdef, (treedef, tuple(leaves)), setup.params, setup.rest, cache, tok, tok,
          one(jnp.int32), one(jnp.int32), one(jnp.float32), one(jnp.int32), one(jnp.float32),
          one(jnp.uint32))
  return ServeStep("prefill", sampler_lib._prefill_step, args, _bytes(setup.params),
                   _bytes(cache), f"1 row x {t} prompt tokens")


def _paged_pool(setup: ServeSetup) -> Any:
  """The abstract page pool with the engine's sharding (parallel/rules.paged_pool_sharding)."""
  import jax

  from klong_jax.parallel import rules as rules_lib
  cfg = setup.model_cfg
  shape = (cfg.num_layers * setup.num_pages, setup.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
  return jax.ShapeDtypeStruct(shape, setup.cache_dtype, sharding=rules_lib.paged_pool_sharding(
      setup.mesh, setup.rules, shape))


def _pool_notes(setup: ServeSetup, pool: Any) -> tuple[str, ...]:
  """How the pool is laid out, and what keeping every page on every chip of the batch axes
  costs per chip (vs per-shard page ranges, which would split it over those axes too)."""
  from klong_jax.parallel import rules as rules_lib
  per_chip = _bytes(pool)
  heads = pool.sharding.spec[2]
  reps = rules_lib.data_parallel_size(rules_lib.batch_sharding(setup.mesh, setup.rules))
  return (f"page pool: {setup.num_pages} pages x {setup.page_size} tokens "
          f"({setup.num_pages * setup.page_size} token slots, {setup.max_batch} x "
          f"{setup.max_len} + prefix pages + trash), kv heads over {heads or 'nothing'}",
          f"pages on every chip of the batch axes (x{reps}): "
          f"{per_chip * (reps - 1) / reps / GIB:.3f} GiB per chip more than per-shard page "
          "ranges would hold")


def _host_arrays(setup: ServeSetup, **shapes: tuple[tuple[int, ...], Any]) -> dict[str, Any]:
  """Replicated abstract arrays (the engine passes host numpy arrays: uncommitted, replicated)."""
  import jax
  rep = _replicated(setup.mesh)
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=rep) for k, (shape, dt) in shapes.items()}


def paged_decode(setup: ServeSetup) -> ServeStep:
  """The paged engine's decode call: `decode_steps` iterations for every row over the page pool,
  with on-device sampling and stops (paged/model.py decode_steps)."""
  import jax.numpy as jnp

  from klong_jax.inference.paged import model as paged_model

  pool = _paged_pool(setup)
  b, k = setup.max_batch, setup.decode_steps
  i32, f32 = jnp.int32, jnp.float32
  state = _host_arrays(
      setup, tokens=((b,), i32), positions=((b,), i32), counters=((b,), i32),
      remaining=((b,), i32), stop_ids=((b, 4), i32),
      page_indices=((b, math.ceil(setup.max_len / setup.page_size)), i32), temp=((b,), f32),
      top_k=((b,), i32), top_p=((b,), f32), seeds=((b,), jnp.uint32))
  return ServeStep("decode", paged_model.decode_steps,
                   (setup.graphdef, setup.params, setup.rest, pool, state),
                   _bytes(setup.params), _bytes(pool), f"{b} rows x {k} decode steps",
                   kwargs=dict(impl=setup.paged_attention, num_pages=setup.num_pages, steps=k),
                   notes=_pool_notes(setup, pool))


def paged_prefill(setup: ServeSetup) -> ServeStep:
  """The paged engine's mixed step at its largest bucket: `token_budget` tokens (prefill chunks
  and decoding rows' tokens) of up to max_batch sequences into the pool (paged/model.py)."""
  import jax.numpy as jnp

  from klong_jax.inference.paged import model as paged_model
  from klong_jax.inference.paged import scheduler

  pool = _paged_pool(setup)
  b, t = setup.max_batch, scheduler.bucket(setup.token_budget, setup.min_bucket)
  i32, f32 = jnp.int32, jnp.float32
  batch = _host_arrays(
      setup, tokens=((t,), i32), positions=((t,), i32), seq=((t,), i32), valid=((t,), jnp.bool_),
      page_indices=((b, math.ceil(setup.max_len / setup.page_size)), i32), kv_lens=((b,), i32),
      cu_q_lens=((b + 1,), i32), num_seqs=((1,), i32), sample_at=((b,), i32), temp=((b,), f32),
      top_k=((b,), i32), top_p=((b,), f32), seeds=((b,), jnp.uint32), counters=((b,), i32))
  return ServeStep("prefill", paged_model.mixed_step,
                   (setup.graphdef, setup.params, setup.rest, pool, batch),
                   _bytes(setup.params), _bytes(pool), f"{t} tokens of up to {b} sequences "
                   "(prefill chunks + decode rows)",
                   kwargs=dict(impl=setup.paged_attention, num_pages=setup.num_pages),
                   notes=_pool_notes(setup, pool))


# engine -> step name -> builder. A new engine adds its builders here; the plan, its checks and
# its report stay the same. "paged": the page pool (serve.kv_pages, else max_batch full rows +
# prefix_cache_mb of pages) split over kv heads, pages on every chip of the batch axes.
ENGINES: dict[str, dict[str, StepBuilder]] = {
    "dense": {"decode": dense_decode, "prefill": dense_prefill},
    "paged": {"decode": paged_decode, "prefill": paged_prefill},
}


def expert_weight_gathers(hlo_text: str, model_cfg: Any, mesh_sizes: Mapping[str, int],
                          rules: tuple | None = None) -> list[str]:
  """All-gather results in `hlo_text` shaped like (a stack of) expert weights: a dim of the
  expert count (or its shard under `rules`), the model dim and the expert hidden dim (or its
  shard)."""
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+all-gather(?:-start)?\(", re.M)
  return _expert_shaped(pattern.findall(hlo_text), model_cfg, mesh_sizes, rules)


def _expert_shaped(shapes: Sequence[str], model_cfg: Any, mesh_sizes: Mapping[str, int],
                   rules: tuple | None = None) -> list[str]:
  """The array types in `shapes` (HLO result types) shaped like (a stack of) expert weights;
  per-chip sizes from `rules` (default: parallel/rules.SERVING_RULES)."""
  from klong_jax.parallel import rules as rules_lib
  rules = rules or rules_lib.SERVING_RULES
  e, f = model_cfg.num_experts, model_cfg.moe_intermediate_size
  experts = {e, e // rules_lib.shard_count(mesh_sizes, rules, "expert")}
  ffn = {f, f // rules_lib.shard_count(mesh_sizes, rules, "expert_mlp")}
  found = []
  for shape in shapes:
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
      d = [int(x) for x in dims.split(",") if x]
      if len(d) >= 3 and model_cfg.hidden_size in d and experts & set(d) and ffn & set(d):
        found.append(f"{dt}[{dims}]")
  return sorted(set(found))


def argument_copies(hlo_text: str) -> list[str]:
  """Result types of the copies of whole arguments (rank >= 3) in the compiled entry computation:
  a weight relaid out on every call, outside any loop (a hoisted relayout holds a second copy of
  that weight for the whole call; inference/weight_layout.py places weights to avoid it)."""
  entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
  if not entry:
    return []
  params = set(re.findall(r"^\s*(%?[\w.\-]+)\s*=\s*\S+\s+parameter\(", entry.group(0), re.M))
  found = []
  for ty, arg in re.findall(r"^\s*%?[\w.\-]+\s*=\s*(\S+)\s+copy\((%?[\w.\-]+)\)",
                            entry.group(0), re.M):
    dims = re.match(r"[a-z]+\d*\[([\d,]*)\]", ty)
    if arg in params and dims and dims.group(1).count(",") >= 2:
      short = ty.split(":")[0]  # Drop the tiling: "bf16[2,4,128,48]{3,2,1,0".
      found.append(short + "}" if "{" in short and not short.endswith("}") else short)
  return found


def tpu_kernels(hlo_text: str) -> dict[str, int]:
  """Mosaic (Pallas TPU) custom calls in compiled HLO by kernel name (the instruction's name
  without its numeric suffix), e.g. {"ragged_paged_attention_kernel": 2}."""
  names = re.findall(r"^\s*(?:ROOT\s+)?%?([\w\-]+?)(?:\.\d+)?\s*=.*custom_call_target="
                     r"\"tpu_custom_call\"", hlo_text, re.M)
  return dict(collections.Counter(names))


def compile_serve_step(setup: ServeSetup, builder: StepBuilder) -> tuple[ServeStep, Any, float]:
  """(step, compiled, seconds); raises plan.CompilerRefused on the TPU compiler's OOM refusal."""
  import jax
  from flax import nnx

  from klong_jax.launch.plan import _lower_compile

  step = builder(setup)
  t0 = time.perf_counter()
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    lowered = step.jitted.lower(*step.args, **step.kwargs)
    compiled = _lower_compile(lowered.compile)
  return step, compiled, time.perf_counter() - t0


def plan_serve(config: Any, mesh_sizes: Mapping[str, int], devices: Sequence[Any], *,
               device: str = _FAKE_CPU, hbm_gib: float | None = None, prefill_len: int = 1024,
               steps: Sequence[str] = ("decode", "prefill"), engine: str | None = None,
               max_batch: int | None = None, max_len: int | None = None) -> list[ServePlan]:
  """Compiles the engine's serving steps for `config` (model, mesh, rules, serve sections) on
  `devices` (a TPU topology's or fake CPUs) and returns one ServePlan per step. `engine`
  defaults to the config's serve.engine."""
  import jax.numpy as jnp

  from klong_jax.inference import serve_config
  from klong_jax.inference.paged import scheduler
  from klong_jax.inference.paged.engine import pool_pages
  from klong_jax.launch.plan import CompilerRefused
  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  from klong_jax.parallel import rules as rules_lib

  serve = serve_config.resolve(config)
  engine = engine or serve.engine
  if engine not in ENGINES:
    raise ValueError(f"engine {engine!r} unknown; use one of {sorted(ENGINES)}")
  max_batch, max_len = int(max_batch or serve.max_batch), int(max_len or serve.max_len)
  model_cfg = from_config_dict(config.model)
  rules = rules_lib.resolve_rules(config.get("rules"))
  size = math.prod(mesh_sizes.values())
  checks.check_mesh(dict(mesh_sizes), len(devices), device)
  checks.check_batch(max_batch, dict(mesh_sizes), rules, field="serve.max_batch")
  try:
    rules_lib.check_divisible(model_cfg, dict(mesh_sizes), rules)
  except ValueError as e:
    raise checks.StartupError(str(e)) from None
  mesh = mesh_lib.make_mesh(dict(mesh_sizes), devices=list(devices)[:size])
  cache_dtype = jnp.dtype(serve.cache_dtype)
  page = int(serve.prefix_block)
  setup = abstract_serving_model(ServeSetup(
      model_cfg, mesh, rules, max_batch, max_len, cache_dtype, min(prefill_len, max_len),
      page_size=page, num_pages=int(serve.kv_pages) or pool_pages(
          model_cfg, max_batch, max_len, page, cache_dtype, serve.prefix_cache_mb),
      token_budget=int(serve.token_budget), decode_steps=int(serve.decode_steps),
      paged_attention=serve.paged_attention, min_bucket=scheduler.MIN_BUCKET))
  out = []
  hbm = None if hbm_gib is None else hbm_gib * GIB
  padded = layout_notes(setup.params)
  for name in steps:
    builder = ENGINES[engine][name]
    base = dict(step=name, mesh=dict(mesh_sizes), max_batch=max_batch, max_len=max_len,
                hbm=hbm, device=device, engine=engine)
    t0 = time.perf_counter()
    try:
      step, compiled, secs = compile_serve_step(setup, builder)
    except CompilerRefused as e:
      step = builder(setup)
      out.append(ServePlan(**base, tokens=step.tokens, weights=step.weights,
                           kv_cache=step.kv_cache, refused=str(e), notes=padded + step.notes,
                           required=topo_lib.required_bytes(str(e)),
                           compile_seconds=time.perf_counter() - t0))
      continue
    m = compiled.memory_analysis()
    found, gathers, kernels, copies = {}, (), {}, ()
    if device != _FAKE_CPU:
      hlo = compiled.as_text()
      found = topo_lib.collectives(hlo)
      kernels = tpu_kernels(hlo)
      gathers = tuple(expert_weight_gathers(hlo, model_cfg, mesh_sizes, rules))
      copies = tuple(argument_copies(hlo))
    out.append(ServePlan(
        **base, tokens=step.tokens, weights=step.weights, kv_cache=step.kv_cache,
        arguments=float(m.argument_size_in_bytes), temp=float(m.temp_size_in_bytes),
        output_not_aliased=float(m.output_size_in_bytes - m.alias_size_in_bytes),
        compile_seconds=secs, collectives=found, expert_gathers=gathers,
        notes=padded + step.notes,
        kernels=kernels, argument_copies=copies))
  return out


def plan_serve_topology(config: Any, topology: str, **kw: Any) -> list[ServePlan]:
  """`plan_serve` compiled by the TPU compiler for `topology` ("v5p-8", "v5p:2x2x1"); the mesh is
  the config's (its -1 filled against the slice's chips)."""
  from klong_jax.launch.plan import resolve_mesh

  topo = topo_lib.parse_topology(topology)
  mesh_sizes = resolve_mesh(config, kw.pop("mesh_sizes", None), topo.chips)
  devs = topo_lib.devices(topo)
  if kw.get("hbm_gib") is None:  # The slice's chip (the CLI passes None when not overridden).
    kw["hbm_gib"] = topo.hbm_gib
  return plan_serve(config, mesh_sizes, devs, device=topo_lib.describe(topo, devs), **kw)

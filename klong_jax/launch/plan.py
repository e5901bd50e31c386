"""AOT memory plan: will this model + mesh + batch fit? Compiles the real SFT / RL step.

  python -m klong_jax.launch.plan --config=configs/sft_glm45_air.py --topology=v5p-256 \
      --mesh=fsdp:16,expert:8 --batch=128 --seq_len=8192 --step=sft,rl

`--step=serve` with a serving config (configs/serve_glm45_air.py:slice=v5p-8) compiles the
inference engine's decode step and a prefill chunk instead (launch/serve_plan.py).
With `--topology` (v5p-8/16/128/256, v6e-8/256, or a libtpu topology such as v5p:2x2x1) the step
is compiled by the real TPU compiler (libtpu, the `jax[tpu]` extra; no TPU needed: see
launch/tpu_topology.py): per-chip bytes against that chip's HBM, the collectives in the TPU HLO,
and DOES NOT FIT with the compiler's own figure when it refuses. Configs that cannot start (mesh
vs chips, batch vs the batch axes, experts/heads vs their axes) are refused before compiling
(launch/checks.py). Without `--topology`, or where libtpu cannot be imported:

the train step from `train/step.py` is lowered against `ShapeDtypeStruct`s carrying the real
shardings on a mesh of fake CPU devices (`--xla_force_host_platform_device_count`, set by
re-executing this module when the device count differs from the mesh size) and compiled; nothing
is allocated. Per device it reports parameters, optimizer state and batch (exact, from the
shardings), XLA's temp (activations + workspace), a peak (inputs + fresh outputs + temp) and
whether that fits the HBM.
Deep models compile slowly on CPU, so with `--probe_layers` (default on past 8 layers) the step
is compiled at 2 and 4 MoE layers and every compiled figure is extrapolated linearly to the full
depth (scanned layers make memory affine in depth); the report says when it did so.
Caveat: the compile is XLA:CPU's, so the MoE dispatch is the CPU path (`moe_impl` blocked) and
fusion/scheduling differ from TPU/GPU; treat temp as an estimate (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging

from klong_jax import config_util
from klong_jax.launch import checks
from klong_jax.launch import tpu_topology as topo_lib

GIB = float(1 << 30)
# MoE-layer counts compiled when extrapolating. Not 1: XLA simplifies a one-trip scan, which
# changes buffer assignment (measured on glm45_air: temp at 1 layer > at 2). 2 -> 4 averages the
# per-layer step over two layers (XLA:CPU's buffer assignment is not exactly affine).
PROBES = (2, 4)
STEPS = ("sft", "rl")
SERVE = "serve"  # --step=serve: the inference engine's decode + prefill steps (serve_plan.py).
_COUNT_FLAG = "--xla_force_host_platform_device_count"
_FAKE_CPU = "CPU, fake devices"


@dataclasses.dataclass(frozen=True)
class Plan(checks.MemoryVerdict):
  """Per-device memory figures (bytes) of one compiled train step, and whether it fits."""

  mesh: dict[str, int]
  batch: int
  seq_len: int
  num_layers: int
  params: float
  optimizer: float
  model_state: float  # Non-param variables (MoE router bias).
  batch_inputs: float
  arguments: float  # XLA: all step inputs (= the persistent figures, a cross-check).
  temp: float  # XLA: activations kept for the backward pass + workspace.
  output_not_aliased: float  # XLA: outputs not written into donated inputs (metrics).
  hbm: float | None
  probed_layers: tuple[int, ...] = ()  # MoE-layer counts compiled when extrapolating.
  compile_seconds: float = 0.0
  notes: tuple[str, ...] = ()  # Settings that shape temp (MoE path, remat), printed last.
  step: str = "sft"  # "sft" (train/step.py) or "rl" (rl/step.py: policy + reference).
  reference: float = 0.0  # RL: the reference policy's params (a second, non-donated tree).
  device: str = _FAKE_CPU  # What compiled it: fake CPU devices or a TPU topology.
  collectives: Mapping[str, topo_lib.Collective] = dataclasses.field(default_factory=dict)
  refused: str = ""  # The TPU compiler's out-of-HBM message when it refused to compile.
  required: float | None = None  # The compiler's own figure in that message (bytes).
  # TPU HLO shapes with two dims >= seq_len (a [T, T] score): none with linear-memory kernels.
  square_buffers: tuple[str, ...] = ()

  @property
  def persistent(self) -> float:
    """State + batch bytes held across steps (the step's inputs)."""
    return self.params + self.optimizer + self.model_state + self.batch_inputs + self.reference

  def report(self) -> str:
    """The human-readable table printed by the CLI."""
    rows = [("parameters (fp32 master)", self.params), ("optimizer state", self.optimizer),
            ("model state", self.model_state), ("batch inputs", self.batch_inputs)]
    if self.step == "rl":
      rows.append(("reference params", self.reference))
    if not self.refused:
      rows += [("activations + temp (XLA)", self.temp), ("peak", self.peak)]
    mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items() if v != 1) or "single device"
    lines = [f"plan ({self.step.upper()} step on {self.device}): mesh {mesh} "
             f"({math.prod(self.mesh.values())} devices), global batch {self.batch} x seq_len "
             f"{self.seq_len}, {self.num_layers} layers"]
    if self.probed_layers and self.refused:
      lines.append(f"  probed at {self.probed_layers[0]} MoE layers (depth cut to "
                   "extrapolate); the compiler refused that already, so the full depth cannot "
                   "fit either")
    elif self.probed_layers:
      lines.append(f"  compiled at {self.probed_layers} MoE layers; compiled figures scaled "
                   f"linearly to {self.num_layers} layers (params/optimizer/batch are exact)")
    unit, scale = ("GiB", GIB) if max(self.peak, self.persistent) >= GIB / 4 else (
        "MiB", float(1 << 20))
    lines.append(f"  {'per-device memory':32s} {unit:>9s}")
    lines += [f"  {name:32s} {value / scale:9.3f}" for name, value in rows]
    if not self.refused and abs(self.arguments - self.persistent) > 0.01 * max(
        self.persistent, 1.0):
      lines.append(f"  note: XLA counts {self.arguments / scale:.3f} {unit} of step inputs, the "
                   f"shardings {self.persistent / scale:.3f} {unit}")
    if self.refused:
      need = "" if self.required is None else f" ({self.required / GIB:.1f} GiB of temporaries)"
      lines.append(f"  the TPU compiler refused{need}: {self.refused}")
      lines.append(f"  compile time {self.compile_seconds:.1f} s until the refusal")
    if (verdict := self.verdict_line(hbm_digits=1)) is not None:
      lines.append(verdict)
    if self.collectives:
      lines += topo_lib.collectives_table(dict(self.collectives))
      square = ", ".join(self.square_buffers[:4]) or "none"
      lines.append(f"  HLO buffers with two dims >= seq_len {self.seq_len}: {square}")
    if not self.refused:
      lines.append(f"  compile time {self.compile_seconds:.1f} s ({self.device})")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def parse_mesh(spec: str) -> dict[str, int]:
  """"fsdp:64,expert:8,tensor:4" -> {"data": 1, "fsdp": 64, "expert": 8, "tensor": 4}.

  No -1: the plan compiles for exactly the product of the sizes (fake devices).
  """
  return {**dict.fromkeys(config_util.MESH_AXES, 1),
          **config_util.parse_mesh(spec, allow_fill=False)}


def default_optim() -> ml_collections.ConfigDict:
  """AdamW section used when the config has none (model-only configs like glm45_air.py)."""
  return ml_collections.ConfigDict(dict(
      lr=1e-5, warmup_steps=10, total_steps=1000, final_lr_ratio=0.1, clip_norm=1.0, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.01, grad_accum=1, compute_dtype="bfloat16",
      lb_coef=1e-3, z_coef=1e-4, expert_bias_rate=1e-3))


def default_rl() -> ml_collections.ConfigDict:
  """RL section used when the config has none: KL to the reference on, routing replay on."""
  return ml_collections.ConfigDict(dict(
      clip_low=0.2, clip_high=0.28, kl_coef=0.001, kl_estimator="k3", kl_clamp=10.0,
      ratio_cap=4.0, normalization="token", temperature=1.0, routing_replay=True, minibatches=1))


def _sharded_bytes(tree: Any, shardings: Any) -> float:
  """Bytes one device holds of `tree` (abstract leaves) laid out by matching `shardings`."""
  import jax
  import numpy as np

  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} leaves but {len(shards)} shardings")
  return float(sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, shards, strict=True)))


@dataclasses.dataclass
class CompiledStep:
  """The compiled step and what built it (so a test can run it on real arrays)."""

  compiled: Any  # jax.stages.Compiled: call it as compiled(state, batch) (RL: state, ref, batch).
  persistent: dict[str, float]  # Per-device bytes of params/optimizer/model_state/batch_inputs.
  seconds: float  # Lower + compile wall time.
  graphdef: Any
  tx: Any
  state_shardings: Any
  batch_sharding: Any


class CompilerRefused(RuntimeError):
  """The TPU compiler refused the step for lack of HBM; the message is the compiler's."""


def _abstract_state(model_cfg: Any, optim_cfg: ml_collections.ConfigDict, mesh: Any,
                    rules: Sequence[tuple[str, Any]]) -> tuple[Any, Any, Any, Any, Any]:
  """(graphdef, TrainState of shapes, optimizer, state shardings, batch sharding) of the real
  model and optimizer on `mesh`, without allocating anything."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from klong_jax.model.transformer import Transformer
  from klong_jax.parallel import rules as rules_lib
  from klong_jax.train import optim
  from klong_jax.train import step as step_lib

  rules_lib.check_divisible(model_cfg, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = step_lib.split_model(abstract)
  tx = optim.make_optimizer(optim_cfg)
  state_sh = step_lib.state_shardings(params, rest, tx, mesh, rules)
  shapes = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params), rest=rest)
  return graphdef, shapes, tx, state_sh, rules_lib.batch_sharding(mesh, rules)


def _batch_abstract(step: str, model_cfg: Any, rl_cfg: Any, batch: int, seq_len: int,
                    sharding: Any = None) -> dict[str, Any]:
  """The step's batch arrays as ShapeDtypeStructs (RL: behaviour logprobs, advantages, routing)."""
  import jax
  import jax.numpy as jnp

  from klong_jax.rl import step as rl_step
  from klong_jax.train import step as step_lib

  keys = step_lib.BATCH_KEYS if step == "sft" else rl_step.batch_keys(rl_cfg)
  out = {}
  for k in keys:
    shape = (batch, seq_len)
    dtype = jnp.float32 if k in ("logprobs", "advantages", "prox_logp") else jnp.int32
    if k == "routing":  # The sampler's expert ids per token and MoE layer.
      shape += (model_cfg.num_moe_layers, model_cfg.num_experts_per_tok)
    out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return out


def _persistent(shapes: Any, state_sh: Any, batch_abs: Mapping[str, Any], batch_sh: Any,
                step: str = "sft") -> dict[str, float]:
  """Per-device bytes of what lives across steps: params, optimizer, model state, the batch
  (RL: and the reference params)."""
  out = {
      "params": _sharded_bytes(shapes.params, state_sh.params),
      "optimizer": _sharded_bytes(shapes.opt_state, state_sh.opt_state),
      "model_state": _sharded_bytes((shapes.step, shapes.rest), (state_sh.step, state_sh.rest)),
      "batch_inputs": _sharded_bytes(batch_abs, {k: batch_sh for k in batch_abs}),
  }
  if step == "rl":
    out["reference"] = out["params"]
  return out


def _lower_compile(lowered_fn: Any) -> Any:
  """Compiles; a TPU out-of-HBM refusal becomes CompilerRefused with the compiler's sentence."""
  try:
    return lowered_fn()
  except Exception as e:  # noqa: BLE001 (XlaRuntimeError / JaxRuntimeError vary by version)
    message = topo_lib.compiler_oom(e)
    if message is None:
      raise
    raise CompilerRefused(message) from e


def compile_step(model_cfg: Any, optim_cfg: ml_collections.ConfigDict, mesh: Any,
                 rules: Sequence[tuple[str, Any]], batch: int, seq_len: int, *,
                 step: str = "sft", rl_cfg: ml_collections.ConfigDict | None = None
                 ) -> CompiledStep:
  """Lowers + compiles the real SFT step (`train.step.make_sft_step`) or RL step
  (`rl.step.make_rl_step`: policy + reference params, behaviour logprobs, advantages, routing)
  on abstract inputs."""
  import jax
  from flax import nnx

  from klong_jax.rl import step as rl_step
  from klong_jax.train import step as step_lib

  if step not in STEPS:
    raise ValueError(f"step {step!r} unknown; use one of {STEPS}")
  rl_cfg = rl_cfg if rl_cfg is not None else default_rl()
  graphdef, shapes, tx, state_sh, batch_sh = _abstract_state(model_cfg, optim_cfg, mesh, rules)
  state_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           shapes, state_sh)
  checks.check_batch(batch, dict(mesh.shape), rules, field="--batch")
  batch_abs = _batch_abstract(step, model_cfg, rl_cfg, batch, seq_len, batch_sh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    if step == "sft":
      fn = step_lib.make_sft_step(graphdef, tx, optim_cfg, state_sh, batch_sh, rules)
      lowered = fn.jitted.lower(state_abs, batch_abs)
    else:
      fn = rl_step.make_rl_step(graphdef, tx, optim_cfg, rl_cfg, state_sh, batch_sh, rules)
      lowered = fn.jitted.lower(state_abs, state_abs.params, batch_abs)
    compiled = _lower_compile(lowered.compile)
  seconds = time.perf_counter() - t0
  return CompiledStep(compiled, _persistent(shapes, state_sh, batch_abs, batch_sh, step),
                      seconds, graphdef, tx, state_sh, batch_sh)


def _compiled_figures(compiled: Any) -> dict[str, float]:
  m = compiled.memory_analysis()
  return {"arguments": float(m.argument_size_in_bytes), "temp": float(m.temp_size_in_bytes),
          "output_not_aliased": float(m.output_size_in_bytes - m.alias_size_in_bytes)}


def _notes(model_cfg: Any, device: str) -> tuple[str, ...]:
  if device == _FAKE_CPU:
    impl = model_cfg.moe_impl if model_cfg.moe_impl != "auto" else "blocked (auto on CPU)"
    return (f"temp is XLA:CPU's figure: MoE path {impl}, moe_block_size "
            f"{model_cfg.moe_block_size}, remat {model_cfg.remat_policy}; TPU/GPU run ragged_dot "
            f"and fuse differently (docs/performance.md)",)
  return (f"temp is the TPU compiler's figure: attention {model_cfg.attention_impl}, MoE "
          f"{model_cfg.moe_impl} experts with {model_cfg.moe_dispatch} dispatch ('auto' = the TPU "
          f"kernels: splash, megablox gmm, all-to-all), MoE token chunk "
          f"{model_cfg.moe_token_chunk or 'off'}, remat {model_cfg.remat_policy}, dtype "
          f"{model_cfg.dtype}; collective counts are static HLO instructions (a scanned layer's "
          "appear once)",)


def plan(config: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int], batch: int,
         seq_len: int, *, hbm_gib: float | None = None, probe_layers: bool | None = None,
         moe_impl: str | None = None, step: str = "sft", devices: Sequence[Any] | None = None,
         device: str = _FAKE_CPU) -> Plan:
  """Compiles the SFT or RL step of `config` on `devices` (default: the current fake CPU
  devices) and returns its Plan.

  The CLI re-executes itself so that JAX has exactly the mesh size of fake CPU devices; a TPU
  plan passes the topology's devices (`plan_topology`).
  `probe_layers`: compile at PROBES MoE layers and extrapolate (None: when > 8 layers).
  """
  import jax

  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  from klong_jax.parallel import rules as rules_lib

  size = math.prod(mesh_sizes.values())
  if devices is None:
    if jax.device_count() < size:
      raise ValueError(f"mesh {dict(mesh_sizes)} needs {size} devices but JAX has "
                       f"{jax.device_count()}; run via `python -m klong_jax.launch.plan` (it "
                       f"sets XLA_FLAGS={_COUNT_FLAG}={size}) or set that flag before importing "
                       "jax")
    devices = jax.devices()[:size]
  model_cfg = from_config_dict(config.model)
  if moe_impl:
    model_cfg = model_cfg.replace(moe_impl=moe_impl)
  # "auto" switches (attention_impl, moe_impl, moe_dispatch) resolve from the platform of the
  # mesh's devices at trace time, so a topology compile on a CPU host picks the TPU kernels.
  optim_cfg = config.optim if "optim" in config else default_optim()
  rl_cfg = config.rl if "rl" in config else default_rl()
  rules = tuple(config.get("rules") or rules_lib.LOGICAL_RULES)
  checks.check_startable(model_cfg, dict(mesh_sizes), batch, chips=len(devices),
                         where=device, rules=rules)
  mesh = mesh_lib.make_mesh(dict(mesh_sizes), devices=list(devices)[:size])
  if probe_layers is None:
    probe_layers = model_cfg.num_layers > 8
  probe_layers = probe_layers and model_cfg.num_moe_layers > PROBES[1]
  hbm = None if hbm_gib is None else hbm_gib * GIB
  base = dict(mesh=dict(mesh_sizes), batch=batch, seq_len=seq_len,
              num_layers=model_cfg.num_layers, hbm=hbm, step=step, device=device,
              notes=_notes(model_cfg, device))
  depths = PROBES if probe_layers else (None,)
  runs, secs, last = [], 0.0, None
  for m in depths:
    cfg = model_cfg if m is None else model_cfg.replace(num_layers=model_cfg.first_k_dense + m)
    if m is not None:
      logging.info("plan: compiling the %s step with %d MoE layer(s)", step, m)
    t0 = time.perf_counter()
    try:
      last = compile_step(cfg, optim_cfg, mesh, rules, batch, seq_len, step=step, rl_cfg=rl_cfg)
    except CompilerRefused as e:
      secs += time.perf_counter() - t0
      # Persistent bytes are exact at full depth from abstract shapes alone.
      full = _persistent_only(model_cfg, optim_cfg, mesh, rules, batch, seq_len, step, rl_cfg)
      at = "" if m is None else f" already at {m} MoE layers"
      return Plan(**base, **full, arguments=0.0, temp=0.0, output_not_aliased=0.0,
                  refused=f"{e}{at}", required=topo_lib.required_bytes(str(e)),
                  compile_seconds=secs,
                  probed_layers=() if m is None else (m,))
    runs.append(_compiled_figures(last.compiled))
    secs += last.seconds
  found, square = {}, ()
  if device != _FAKE_CPU:
    hlo = last.compiled.as_text()
    found, square = topo_lib.collectives(hlo), tuple(topo_lib.square_buffers(hlo, seq_len))
  if not probe_layers:
    return Plan(**base, **last.persistent, **runs[0], compile_seconds=secs, collectives=found,
                square_buffers=square)
  # Exact persistent bytes at full depth (abstract only), compiled figures at PROBES depths.
  full = _persistent_only(model_cfg, optim_cfg, mesh, rules, batch, seq_len, step, rl_cfg)
  extra = (model_cfg.num_moe_layers - PROBES[0]) / (PROBES[1] - PROBES[0])
  figures = {k: runs[0][k] + extra * (runs[1][k] - runs[0][k]) for k in runs[0]}
  return Plan(**base, **full, **figures, probed_layers=PROBES, compile_seconds=secs,
              collectives=found, square_buffers=square)


def plan_topology(config: ml_collections.ConfigDict, topology: str,
                  mesh_sizes: Mapping[str, int] | None, batch: int, seq_len: int, *,
                  hbm_gib: float | None = None, probe_layers: bool | None = None,
                  moe_impl: str | None = None, step: str = "sft") -> Plan:
  """`plan` compiled by the TPU compiler for `topology` (e.g. "v5p-256", "v5p:2x2x1").

  `mesh_sizes` None: the config's mesh section resolved against the slice's chips (-1 fills).
  Refuses (checks.StartupError, before compiling) configs that cannot start.
  """
  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import rules as rules_lib

  topo = topo_lib.parse_topology(topology)
  mesh_sizes = resolve_mesh(config, mesh_sizes, topo.chips)
  rules = tuple(config.get("rules") or rules_lib.LOGICAL_RULES)
  checks.check_startable(from_config_dict(config.model), mesh_sizes, batch, chips=topo.chips,
                         where=topo.accelerator, rules=rules)
  devs = topo_lib.devices(topo)
  return plan(config, mesh_sizes, batch, seq_len, probe_layers=probe_layers, moe_impl=moe_impl,
              step=step, devices=devs, device=topo_lib.describe(topo, devs),
              hbm_gib=topo.hbm_gib if hbm_gib is None else hbm_gib)


def resolve_mesh(config: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int] | None,
                 chips: int) -> dict[str, int]:
  """Explicit sizes, or the config's mesh section (-1 filled) against `chips`."""
  from klong_jax.parallel.mesh import mesh_shape

  if mesh_sizes is not None:
    return dict(mesh_sizes)
  sizes = config.mesh.to_dict() if "mesh" in config else {"fsdp": -1}
  return dict(zip(config_util.MESH_AXES, mesh_shape(sizes, chips), strict=True))


def _persistent_only(model_cfg: Any, optim_cfg: ml_collections.ConfigDict, mesh: Any,
                     rules: Sequence[tuple[str, Any]], batch: int, seq_len: int,
                     step: str = "sft", rl_cfg: Any = None) -> dict[str, float]:
  """Per-device params / optimizer / model-state / batch bytes from abstract shapes alone."""
  _, shapes, _, state_sh, batch_sh = _abstract_state(model_cfg, optim_cfg, mesh, rules)
  batch_abs = _batch_abstract(step, model_cfg, rl_cfg or default_rl(), batch, seq_len)
  return _persistent(shapes, state_sh, batch_abs, batch_sh, step)


def plan_from_compiled(one: CompiledStep, mesh_sizes: Mapping[str, int], batch: int,
                       seq_len: int, num_layers: int, hbm_gib: float | None = None) -> Plan:
  """The Plan of one compiled step (no extrapolation)."""
  figures = _compiled_figures(one.compiled)
  return Plan(mesh=dict(mesh_sizes), batch=batch, seq_len=seq_len, num_layers=num_layers,
              **one.persistent, **figures, hbm=None if hbm_gib is None else hbm_gib * GIB,
              compile_seconds=one.seconds, step="rl" if "reference" in one.persistent else "sft")


def device_env(num_devices: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """`environ` with XLA_FLAGS forcing `num_devices` fake CPU devices and JAX on CPU."""
  env = dict(os.environ if environ is None else environ)
  xla = re.sub(rf"{_COUNT_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{xla} {_COUNT_FLAG}={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _has_device_count(num_devices: int) -> bool:
  flags_now = os.environ.get("XLA_FLAGS", "")
  return (f"{_COUNT_FLAG}={num_devices}" in flags_now.split()
          and os.environ.get("JAX_PLATFORMS") == "cpu")


_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """CLI flags, defined only when run as a program (importers keep their flag namespace)."""
  from ml_collections import config_flags

  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Experiment/model config.")
  _FLAGS["topology"] = flags.DEFINE_string(
      "topology", "", "Compile with the TPU compiler for this slice: v5p-256, v5p-8, v6e-256, "
      "v5p:2x2x1 ... (needs libtpu; without it the fake-CPU plan runs and says so).")
  _FLAGS["mesh"] = flags.DEFINE_string("mesh", "", "Mesh as axis:size list, e.g. "
                                       "fsdp:16,expert:8 (default: the config's mesh on the "
                                       "topology; fsdp:8 on fake CPUs).")
  _FLAGS["batch"] = flags.DEFINE_integer("batch", None, "Global rows per compiled step "
                                         "(default: data.batch_size; RL: / rl.minibatches).")
  _FLAGS["seq_len"] = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: "
                                           "data.row_len, else 1024).")
  _FLAGS["step"] = flags.DEFINE_list("step", ["sft"], "Steps to compile: sft, rl or sft,rl; "
                                     "serve: a serving config's decode step + a prefill chunk.")
  _FLAGS["prefill_len"] = flags.DEFINE_integer("prefill_len", 1024, "--step=serve: prompt "
                                               "tokens of the compiled prefill chunk.")
  _FLAGS["engine"] = flags.DEFINE_string("engine", "", "--step=serve: the engine whose steps "
                                         "compile (dense | paged; default: serve.engine).")
  _FLAGS["out"] = flags.DEFINE_string("out", "", "--step=serve: also write the plans as JSON "
                                      "to this file.")
  _FLAGS["hbm_gib"] = flags.DEFINE_float("hbm_gib", None, "Per-device HBM in GiB (default: "
                                         "the topology's chip; v5p 95.74, v6e 31.25).")
  _FLAGS["probe"] = flags.DEFINE_enum("probe_layers", "auto", ["auto", "yes", "no"],
                                      "Compile 2 and 4 MoE layers, extrapolate (auto: > 8 layers).")
  _FLAGS["moe_impl"] = flags.DEFINE_string("moe_impl", "", "Override model.moe_impl.")


def _defaults(config: ml_collections.ConfigDict, step: str, batch: int | None,
              seq_len: int | None) -> tuple[int, int]:
  data = config.get("data") or {}
  if batch is None:
    batch = int(data.get("batch_size", 8))
    if step == "rl" and "rl" in config:
      batch //= max(1, int(config.rl.get("minibatches", 1)))
  return batch, int(seq_len or data.get("row_len", 1024))


def main(argv: list[str]) -> None:
  del argv
  f = {k: v.value for k, v in _FLAGS.items()}
  if f["config"] is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  bad = [s for s in f["step"] if s not in (*STEPS, SERVE)]
  if bad:
    raise app.UsageError(f"--step={','.join(bad)}: use sft, rl, sft,rl or serve")
  if SERVE in f["step"] and not f["mesh"] and all(
      v > 0 for v in (f["config"].get("mesh") or {"fsdp": -1}).values()):
    f["mesh"] = ",".join(f"{k}:{v}" for k, v in f["config"].mesh.items())  # The serving mesh.
  topology, hbm = f["topology"], f["hbm_gib"]
  if topology:
    problem = topo_lib.libtpu_status()
    topo = topo_lib.parse_topology(topology)
    if problem:  # No TPU compiler here: the fake-CPU plan of the same mesh, said so.
      print(f"plan: {problem}; planning on fake CPU devices instead", flush=True)
      topology, hbm = "", topo.hbm_gib if hbm is None else hbm
      f["mesh"] = f["mesh"] or ",".join(
          f"{k}:{v}" for k, v in resolve_mesh(f["config"], None, topo.chips).items())
  if not topology:
    size = math.prod(parse_mesh(f["mesh"] or "fsdp:8").values())
    need = _has_device_count(size)
  else:
    need = os.environ.get("JAX_PLATFORMS") == "cpu"
    size = 1
  if not need:
    # JAX fixes its device count / platform at import: restart with fake CPU devices.
    logging.info("plan: re-executing with %d fake CPU devices", size)
    sys.stdout.flush()
    env = device_env(size)  # JAX on CPU (a TPU plan compiles for the topology from there).
    os.execve(sys.executable, [sys.executable, "-m", "klong_jax.launch.plan", *sys.argv[1:]],
              env)
  probe = {"auto": None, "yes": True, "no": False}[f["probe"]]
  failed = False
  for step in f["step"]:
    if step == SERVE:
      failed = not _serve_main(f, topology, hbm) or failed
      continue
    batch, seq_len = _defaults(f["config"], step, f["batch"], f["seq_len"])
    kw = dict(probe_layers=probe, moe_impl=f["moe_impl"] or None, step=step)
    try:
      if topology:
        result = plan_topology(f["config"], topology, parse_mesh(f["mesh"]) if f["mesh"]
                               else None, batch, seq_len, hbm_gib=hbm, **kw)
      else:
        result = plan(f["config"], parse_mesh(f["mesh"] or "fsdp:8"), batch, seq_len,
                      hbm_gib=hbm, **kw)
    except checks.StartupError as e:
      print(f"plan ({step.upper()} step): REFUSED, this config cannot start: {e}", flush=True)
      failed = True
      continue
    print(result.report(), flush=True)
  if failed:
    sys.exit(2)


def _serve_main(f: dict[str, Any], topology: str, hbm: float | None) -> bool:
  """--step=serve: prints the serving plans; False when the config cannot start or not fit."""
  import jax

  from klong_jax.launch import serve_plan

  mesh = parse_mesh(f["mesh"]) if f["mesh"] else None
  kw = dict(prefill_len=f["prefill_len"], max_batch=f["batch"], max_len=f["seq_len"],
            engine=f["engine"] or None)
  try:
    if topology:
      plans = serve_plan.plan_serve_topology(f["config"], topology, mesh_sizes=mesh,
                                             hbm_gib=hbm, **kw)
    else:
      mesh = mesh or parse_mesh("fsdp:8")
      plans = serve_plan.plan_serve(f["config"], mesh, jax.devices()[:math.prod(mesh.values())],
                                    hbm_gib=hbm, **kw)
  except checks.StartupError as e:
    print(f"plan (SERVE): REFUSED, this config cannot start: {e}", flush=True)
    return False
  for p in plans:
    print(p.report(), flush=True)
  if f["out"]:  # Read by benchmarks and reports: written atomically (temp file + rename).
    from klong_jax import fileio
    fileio.atomic_write_json(f["out"], {"argv": sys.argv, "topology": topology,
                                        "plans": [p.as_dict() for p in plans]}, indent=1)
  return all(p.fits is not False for p in plans)


def entry() -> None:
  """Console entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

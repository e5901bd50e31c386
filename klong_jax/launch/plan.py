"""AOT memory plan: will this model + mesh + batch fit? Compiles the real SFT step on fake devices.

  python -m klong_jax.launch.plan --config=configs/glm45_air.py:remat=full \
      --config.model.moe_block_size=2048 --mesh=fsdp:64,expert:8,tensor:4 \
      --batch=512 --seq_len=4096 --hbm_gib=95

The train step from `train/step.py` is lowered against `ShapeDtypeStruct`s carrying the real
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
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging

from klong_jax import config_util

GIB = float(1 << 30)
# MoE-layer counts compiled when extrapolating. Not 1: XLA simplifies a one-trip scan, which
# changes buffer assignment (measured on glm45_air: temp at 1 layer > at 2). 2 -> 4 averages the
# per-layer step over two layers (XLA:CPU's buffer assignment is not exactly affine).
PROBES = (2, 4)
_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device memory figures (bytes) of one compiled train step, and whether it fits."""

  mesh: dict[str, int]
  batch: int
  seq_len: int
  num_layers: int
  params: float
  optimizer: float
  model_state: float  # Non-param variables (MoE router bias).
  batch_inputs: float
  arguments: float  # XLA: all step inputs (= the above four, a cross-check).
  temp: float  # XLA: activations kept for the backward pass + workspace.
  output_not_aliased: float  # XLA: outputs not written into donated inputs (metrics).
  hbm: float | None
  probed_layers: tuple[int, ...] = ()  # MoE-layer counts compiled when extrapolating.
  compile_seconds: float = 0.0
  notes: tuple[str, ...] = ()  # Settings that shape temp (MoE path, remat), printed last.

  @property
  def persistent(self) -> float:
    """State + batch bytes held across steps (the step's inputs)."""
    return self.params + self.optimizer + self.model_state + self.batch_inputs

  @property
  def peak(self) -> float:
    """Arguments + fresh outputs + temp: an upper bound on live bytes during the step.

    (XLA:CPU's own `peak_memory_in_bytes` leaves temp out, so it is not used.)
    """
    return self.arguments + self.output_not_aliased + self.temp

  @property
  def fits(self) -> bool | None:
    return None if self.hbm is None else self.peak <= self.hbm

  def report(self) -> str:
    """The human-readable table printed by the CLI."""
    rows = [("parameters (fp32 master)", self.params), ("optimizer state", self.optimizer),
            ("model state", self.model_state), ("batch inputs", self.batch_inputs),
            ("activations + temp (XLA)", self.temp), ("peak", self.peak)]
    mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items() if v != 1) or "single device"
    lines = [f"plan: mesh {mesh} ({math.prod(self.mesh.values())} devices), global batch "
             f"{self.batch} x seq_len {self.seq_len}, {self.num_layers} layers"]
    if self.probed_layers:
      lines.append(f"  compiled at {self.probed_layers} MoE layers; compiled figures scaled "
                   f"linearly to {self.num_layers} layers (params/optimizer/batch are exact)")
    unit, scale = ("GiB", GIB) if self.peak >= GIB / 4 else ("MiB", float(1 << 20))
    lines.append(f"  {'per-device memory':32s} {unit:>9s}")
    lines += [f"  {name:32s} {value / scale:9.3f}" for name, value in rows]
    if abs(self.arguments - self.persistent) > 0.01 * max(self.persistent, 1.0):
      lines.append(f"  note: XLA counts {self.arguments / scale:.3f} {unit} of step inputs, the "
                   f"shardings {self.persistent / scale:.3f} {unit}")
    if self.hbm is not None:
      verdict = "FITS" if self.fits else "DOES NOT FIT"
      lines.append(f"  HBM {self.hbm / GIB:.1f} GiB: {verdict} "
                   f"({100 * self.peak / self.hbm:.0f}% of HBM)")
    lines.append(f"  compile time {self.compile_seconds:.1f} s (CPU, fake devices)")
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
  """The compiled SFT step and what built it (so a test can run it on real arrays)."""

  compiled: Any  # jax.stages.Compiled: call it as compiled(state, batch).
  persistent: dict[str, float]  # Per-device bytes of params/optimizer/model_state/batch_inputs.
  seconds: float  # Lower + compile wall time.
  graphdef: Any
  tx: Any
  state_shardings: Any
  batch_sharding: Any


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


def _persistent(shapes: Any, state_sh: Any, batch_abs: Mapping[str, Any], batch_sh: Any
                ) -> dict[str, float]:
  """Per-device bytes of what lives across steps: params, optimizer, model state, the batch."""
  return {
      "params": _sharded_bytes(shapes.params, state_sh.params),
      "optimizer": _sharded_bytes(shapes.opt_state, state_sh.opt_state),
      "model_state": _sharded_bytes((shapes.step, shapes.rest), (state_sh.step, state_sh.rest)),
      "batch_inputs": _sharded_bytes(batch_abs, {k: batch_sh for k in batch_abs}),
  }


def compile_step(model_cfg: Any, optim_cfg: ml_collections.ConfigDict, mesh: Any,
                 rules: Sequence[tuple[str, Any]], batch: int, seq_len: int) -> CompiledStep:
  """Lowers + compiles the real SFT step (`train.step.make_sft_step`) on abstract inputs."""
  import time

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from klong_jax.train import step as step_lib

  graphdef, shapes, tx, state_sh, batch_sh = _abstract_state(model_cfg, optim_cfg, mesh, rules)
  state_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           shapes, state_sh)
  rows = math.prod(mesh.shape[a] for a in _flat(batch_sh.spec[0]))
  if batch % rows:
    raise ValueError(f"--batch={batch} does not divide over the batch mesh axes "
                     f"{batch_sh.spec[0]} (size {rows}); use a multiple of {rows}")
  batch_abs = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sh)
               for k in step_lib.BATCH_KEYS}
  step = step_lib.make_sft_step(graphdef, tx, optim_cfg, state_sh, batch_sh, rules)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = step.jitted.lower(state_abs, batch_abs).compile()
  seconds = time.perf_counter() - t0
  return CompiledStep(compiled, _persistent(shapes, state_sh, batch_abs, batch_sh), seconds,
                      graphdef, tx, state_sh, batch_sh)


def _flat(axes: Any) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _compiled_figures(compiled: Any) -> dict[str, float]:
  m = compiled.memory_analysis()
  return {"arguments": float(m.argument_size_in_bytes), "temp": float(m.temp_size_in_bytes),
          "output_not_aliased": float(m.output_size_in_bytes - m.alias_size_in_bytes)}


def plan(config: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int], batch: int,
         seq_len: int, *, hbm_gib: float | None = None, probe_layers: bool | None = None,
         moe_impl: str | None = None) -> Plan:
  """Compiles the SFT step of `config` on the current (fake) devices and returns its Plan.

  The mesh uses the first mesh-size devices; the CLI re-executes itself so that JAX has exactly
  that many fake CPU devices.
  `probe_layers`: compile at PROBES MoE layers and extrapolate (None: when > 8 layers).
  """
  import jax

  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  from klong_jax.parallel import rules as rules_lib

  size = math.prod(mesh_sizes.values())
  if jax.device_count() < size:
    raise ValueError(f"mesh {dict(mesh_sizes)} needs {size} devices but JAX has "
                     f"{jax.device_count()}; run via `python -m klong_jax.launch.plan` (it sets "
                     f"XLA_FLAGS={_COUNT_FLAG}={size}) or set that flag before importing jax")
  model_cfg = from_config_dict(config.model)
  if moe_impl:
    model_cfg = model_cfg.replace(moe_impl=moe_impl)
  optim_cfg = config.optim if "optim" in config else default_optim()
  rules = tuple(config.rules or rules_lib.LOGICAL_RULES)
  mesh = mesh_lib.make_mesh(dict(mesh_sizes), devices=jax.devices()[:size])
  if probe_layers is None:
    probe_layers = model_cfg.num_layers > 8
  probe_layers = probe_layers and model_cfg.num_moe_layers > PROBES[1]

  impl = model_cfg.moe_impl if model_cfg.moe_impl != "auto" else "blocked (auto on CPU)"
  notes = (f"temp is XLA:CPU's figure: MoE path {impl}, moe_block_size "
           f"{model_cfg.moe_block_size}, remat {model_cfg.remat_policy}; TPU/GPU run ragged_dot "
           f"and fuse differently (docs/performance.md)",)
  if not probe_layers:
    one = compile_step(model_cfg, optim_cfg, mesh, rules, batch, seq_len)
    return dataclasses.replace(
        plan_from_compiled(one, mesh_sizes, batch, seq_len, model_cfg.num_layers, hbm_gib),
        notes=notes)
  else:
    # Exact persistent bytes at full depth (abstract only), compiled figures at PROBES depths.
    full = _persistent_only(model_cfg, optim_cfg, mesh, rules, batch, seq_len)
    probed = PROBES
    runs, secs = [], 0.0
    for m in probed:
      small = model_cfg.replace(num_layers=model_cfg.first_k_dense + m)
      logging.info("plan: compiling with %d MoE layer(s)", m)
      one = compile_step(small, optim_cfg, mesh, rules, batch, seq_len)
      runs.append(_compiled_figures(one.compiled))
      secs += one.seconds
    extra = (model_cfg.num_moe_layers - probed[0]) / (probed[1] - probed[0])
    figures = {k: runs[0][k] + extra * (runs[1][k] - runs[0][k]) for k in runs[0]}
    persistent = full
  return Plan(mesh=dict(mesh_sizes), batch=batch, seq_len=seq_len,
              num_layers=model_cfg.num_layers, **persistent, arguments=figures["arguments"],
              temp=figures["temp"], output_not_aliased=figures["output_not_aliased"],
              hbm=None if hbm_gib is None else hbm_gib * GIB, probed_layers=probed,
              compile_seconds=secs, notes=notes)


def plan_from_compiled(one: CompiledStep, mesh_sizes: Mapping[str, int], batch: int,
                       seq_len: int, num_layers: int, hbm_gib: float | None = None) -> Plan:
  """The Plan of one compiled step (no extrapolation)."""
  figures = _compiled_figures(one.compiled)
  return Plan(mesh=dict(mesh_sizes), batch=batch, seq_len=seq_len, num_layers=num_layers,
              **one.persistent, **figures, hbm=None if hbm_gib is None else hbm_gib * GIB,
              compile_seconds=one.seconds)


def _persistent_only(model_cfg: Any, optim_cfg: ml_collections.ConfigDict, mesh: Any,
                     rules: Sequence[tuple[str, Any]], batch: int, seq_len: int
                     ) -> dict[str, float]:
  """Per-device params / optimizer / model-state / batch bytes from abstract shapes alone."""
  import jax
  import jax.numpy as jnp

  from klong_jax.train import step as step_lib

  _, shapes, _, state_sh, batch_sh = _abstract_state(model_cfg, optim_cfg, mesh, rules)
  batch_abs = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) for k in step_lib.BATCH_KEYS}
  return _persistent(shapes, state_sh, batch_abs, batch_sh)


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
  _FLAGS["mesh"] = flags.DEFINE_string("mesh", "fsdp:8", "Mesh as axis:size list, e.g. "
                                       "fsdp:64,expert:8,tensor:4.")
  _FLAGS["batch"] = flags.DEFINE_integer("batch", 8, "Global batch (rows).")
  _FLAGS["seq_len"] = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
  _FLAGS["hbm_gib"] = flags.DEFINE_float("hbm_gib", None, "Per-device HBM in GiB (v5p: 95).")
  _FLAGS["probe"] = flags.DEFINE_enum("probe_layers", "auto", ["auto", "yes", "no"],
                                      "Compile 2 and 4 MoE layers, extrapolate (auto: > 8 layers).")
  _FLAGS["moe_impl"] = flags.DEFINE_string("moe_impl", "", "Override model.moe_impl.")


def main(argv: list[str]) -> None:
  del argv
  f = {k: v.value for k, v in _FLAGS.items()}
  size = math.prod(parse_mesh(f["mesh"]).values())
  if not _has_device_count(size):
    # JAX fixes its device count at import: restart this module with the right fake devices.
    logging.info("plan: re-executing with %d fake CPU devices", size)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "klong_jax.launch.plan", *sys.argv[1:]],
              device_env(size))
  if f["config"] is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  probe = {"auto": None, "yes": True, "no": False}[f["probe"]]
  result = plan(f["config"], parse_mesh(f["mesh"]), f["batch"], f["seq_len"],
                hbm_gib=f["hbm_gib"], probe_layers=probe, moe_impl=f["moe_impl"] or None)
  print(result.report())


def entry() -> None:
  """Console entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

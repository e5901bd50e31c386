"""Import / export of HF safetensors checkpoints (GLM-4.5 `Glm4MoeForCausalLM`, Qwen3-MoE).

Import streams tensor by tensor: every param is built with `jax.make_array_from_callback`, whose
callback reads from the (mmapped) safetensors files only the window each addressable device holds,
so host memory peaks at about one device shard, never the whole model, and each host of a pod
reads only its own shards. The whole plan (missing / unknown tensors, shapes) is checked from
the file headers before any data is read. Export gathers one layer of one param at a time and
writes shards of bounded size plus `model.safetensors.index.json` and `config.json` into a temp
dir that is renamed into place.

CLI (absl):
  python -m klong_jax.model.hf --import_dir=HF_DIR --out=RUN/policy [--version=0] [--mesh=fsdp:-1]
  python -m klong_jax.model.hf --export --policy=RUN/policy[/N] --out=HF_DIR [--arch=glm4_moe]
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from klong_jax.model import hf_names
from klong_jax.model.config import ModelConfig
from klong_jax.model.hf_names import HFCheckpointError, TensorSpec
from klong_jax.model.transformer import Transformer

INDEX = "model.safetensors.index.json"
ORIGINAL_CONFIG = "hf_config.json"  # An imported config.json, kept beside the policy versions.
_NO_CAST = ("e_score_correction_bias",)  # Kept in fp32 on export, as HF checkpoints do.


class SafetensorsReader:
  """The tensors of one HF checkpoint dir (single file or sharded with an index), opened lazily."""

  def __init__(self, path: str | os.PathLike):
    self.dir = pathlib.Path(path)
    self._handles: dict[str, Any] = {}
    index = self.dir / INDEX
    if index.is_file():
      self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
      for file in sorted(set(self.weight_map.values())):
        if not (self.dir / file).is_file():
          raise FileNotFoundError(f"{index} lists {file}, which is not in {self.dir}")
    else:
      files = sorted(p.name for p in self.dir.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors (nor {INDEX}) in {self.dir}; point at an HF "
                                "checkpoint directory")
      self.weight_map = {name: file for file in files for name in self._open(file).keys()}

  def _open(self, file: str) -> Any:
    if file not in self._handles:
      self._handles[file] = safe_open(str(self.dir / file), framework="numpy")
    return self._handles[file]

  def names(self) -> list[str]:
    return list(self.weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

  def read(self, name: str, slices: tuple[slice, ...] = ()) -> np.ndarray:
    """Tensor `name` (or just `slices` of it; only those bytes are read)."""
    part = self._open(self.weight_map[name]).get_slice(name)
    return part[slices] if slices else part[:]

  def close(self) -> None:
    self._handles.clear()

  def __enter__(self) -> SafetensorsReader:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's config.json as a dict."""
  file = pathlib.Path(path) / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} is missing; an HF checkpoint dir needs its config.json "
                            "(or pass cfg= explicitly)")
  return json.loads(file.read_text())


def load_hf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
  """ModelConfig of the HF checkpoint at `path` (config.json), with field overrides."""
  return hf_names.from_hf_config(read_hf_config(path), **overrides)


# ---- param tree helpers ----------------------------------------------------------------------

def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out += _leaf_paths(value, (*prefix, str(key)))
    else:
      out.append((*prefix, str(key)))
  return out


def _matched_specs(cfg: ModelConfig, tree: Mapping[str, Any]) -> list[TensorSpec]:
  """`tensor_specs(cfg)`, checked to cover exactly the leaves of the pure param `tree`."""
  specs = hf_names.tensor_specs(cfg)
  have = set(_leaf_paths(tree))
  mapped = {s.path for s in specs}
  if have - mapped:
    raise HFCheckpointError(f"model params {sorted('/'.join(p) for p in have - mapped)} have no "
                            "HF name; add them to hf_names.tensor_specs")
  if mapped - have:
    raise HFCheckpointError(f"params {sorted('/'.join(p) for p in mapped - have)} are missing "
                            "from the model tree; does the config match the model?")
  return specs


def params_tree(model: Any) -> dict[str, Any]:
  """Pure nested dict of every variable (Params and the router's ExpertBias) of a model/State."""
  if isinstance(model, nnx.Module):
    model = nnx.state(model)
  if isinstance(model, nnx.State):
    model = model.to_pure_dict()
  return model


def abstract_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                   rules: Any = None) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, abstract state, shardings as a pure dict) of Transformer(cfg) on `mesh`."""
  if mesh is None:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return graphdef, state, jax.tree.map(lambda _: one, state.to_pure_dict())
  from klong_jax.parallel.rules import LOGICAL_RULES, check_divisible
  rules = LOGICAL_RULES if rules is None else rules
  check_divisible(cfg, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(state, mesh).to_pure_dict()
  return graphdef, state, shardings


# ---- import ----------------------------------------------------------------------------------

def check_checkpoint(reader: SafetensorsReader, cfg: ModelConfig, tree: Mapping[str, Any],
                     hf_config: Mapping[str, Any] | None = None) -> list[TensorSpec]:
  """Checks names and shapes from the headers only; raises naming the first bad tensor."""
  specs = _matched_specs(cfg, tree)
  hf_config = dict(hf_config or {"num_hidden_layers": cfg.num_layers})
  expected: dict[str, tuple[int, ...]] = {}
  for spec in specs:
    shape = _get(tree, spec.path).shape
    want = hf_names.hf_shape(spec, shape[spec.lead:])
    for _, name in hf_names.expand(spec, shape):
      expected[name] = want
  present = set(reader.names())
  missing = [n for n in expected if n not in present]
  if missing:
    raise HFCheckpointError(
        f"tensor {missing[0]!r} (expected shape {expected[missing[0]]}) is missing from "
        f"{reader.dir} ({len(missing)} missing in all); is it a checkpoint of this config?")
  skip = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unknown = [n for n in reader.names() if n not in expected and n not in skip
             and not hf_names.ignored(n, hf_config)]
  if unknown:
    raise HFCheckpointError(
        f"tensor {unknown[0]!r} in {reader.dir} is unknown to this model config "
        f"({len(unknown)} unknown in all: {unknown[:5]}); check config.json / the arch")
  for name, want in expected.items():
    got = reader.shape(name)
    if got != want:
      raise HFCheckpointError(f"tensor {name!r} has shape {got}, expected {want}; the config "
                              "does not match the checkpoint")
  return specs


def _build(reader: SafetensorsReader, spec: TensorSpec, like: Any,
           sharding: jax.sharding.Sharding) -> jax.Array:
  """One param as a (sharded) jax.Array; each device's window is read straight from the files."""
  shape, lead = tuple(like.shape), spec.lead
  per = shape[lead:]
  dtype = np.dtype(like.dtype)

  def window(index: tuple[slice, ...]) -> np.ndarray:
    win = [sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True)]
    out = np.empty([hi - lo for lo, hi in win], dtype)
    stack_win, tensor_win = win[:lead], win[lead:]
    for local in np.ndindex(*out.shape[:lead]):
      idx = tuple(lo + i for (lo, _), i in zip(stack_win, local, strict=True))
      name = hf_names.hf_name(spec, idx)
      out[local] = hf_names.read_slice(spec, lambda sl, name=name: reader.read(name, sl), per,
                                       tensor_win)
    return out

  return jax.make_array_from_callback(shape, sharding, window)


def import_hf(path: str | os.PathLike, cfg: ModelConfig | None = None,
              mesh: jax.sharding.Mesh | None = None, rules: Any = None,
              **overrides: Any) -> Transformer:
  """A Transformer whose params come from the HF checkpoint at `path`, sharded on `mesh`.

  `cfg` defaults to the one config.json describes (with `overrides`, e.g. param_dtype=...).
  """
  hf_config = read_hf_config(path) if (pathlib.Path(path) / "config.json").is_file() else None
  if cfg is None:
    if hf_config is None:
      read_hf_config(path)  # Raises naming the missing config.json.
    cfg = hf_names.from_hf_config(hf_config, **overrides)
  elif overrides:
    cfg = cfg.replace(**overrides)
  graphdef, state, shardings = abstract_model(cfg, mesh, rules)
  tree = state.to_pure_dict()
  with SafetensorsReader(path) as reader:
    specs = check_checkpoint(reader, cfg, tree, hf_config)
    for spec in specs:
      _set(tree, spec.path, _build(reader, spec, _get(tree, spec.path),
                                   _get(shardings, spec.path)))
  state.replace_by_pure_dict(tree)
  return nnx.merge(graphdef, state)


# ---- export ----------------------------------------------------------------------------------

class _ShardWriter:
  """Collects tensors into safetensors files of at most `max_bytes` (one bigger tensor alone)."""

  def __init__(self, directory: pathlib.Path, max_bytes: int):
    self.dir, self.max_bytes = directory, max_bytes
    self.pending: dict[str, np.ndarray] = {}
    self.pending_bytes = 0
    self.files: list[list[str]] = []
    self.total = 0

  def add(self, name: str, array: np.ndarray) -> None:
    if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
      self.flush()
    self.pending[name] = np.ascontiguousarray(array)
    self.pending_bytes += array.nbytes
    self.total += array.nbytes

  def flush(self) -> None:
    if self.pending:
      save_file(self.pending, str(self.dir / f".part-{len(self.files)}"), metadata={"format": "pt"})
      self.files.append(list(self.pending))
      self.pending, self.pending_bytes = {}, 0

  def finish(self) -> dict[str, Any]:
    """Renames parts to model-0000i-of-0000n.safetensors; returns the index dict."""
    self.flush()
    n = len(self.files)
    weight_map = {}
    for i, names in enumerate(self.files):
      final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(self.dir / f".part-{i}", self.dir / final)
      weight_map.update(dict.fromkeys(names, final))
    return {"metadata": {"total_size": self.total}, "weight_map": weight_map}


@jax.jit
def _take(x: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def layer_from_device(leaf: jax.Array, i: int) -> np.ndarray:
  """`leaf[i]` gathered to host by one jitted slice (compiled once per param shape)."""
  return np.asarray(jax.device_get(_take(leaf, i)))


def layer_from_host_shards(leaf: jax.Array, i: int) -> np.ndarray:
  """`leaf[i]` copied out of the addressable shards (CPU: they already live in host memory)."""
  out = np.empty(leaf.shape[1:], leaf.dtype)
  done = set()
  for shard in leaf.addressable_shards:
    win = [sl.indices(n)[:2] for sl, n in zip(shard.index, leaf.shape, strict=True)]
    (lo, hi), rest = win[0], tuple(win[1:])
    if lo <= i < hi and rest not in done:  # Replicas of a window are copied once.
      done.add(rest)
      out[tuple(slice(a, b) for a, b in rest)] = np.asarray(shard.data)[i - lo]
  if len(done) == 0:
    raise HFCheckpointError(f"layer {i} of a param shaped {leaf.shape} is on no local device")
  return out


def _fetch(leaf: Any, idx: tuple[int, ...]) -> np.ndarray:
  """Host copy of `leaf[idx]` (idx: () or one layer of a stacked param), one layer at a time."""
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf[idx] if idx else leaf)
  if not leaf.is_fully_addressable:
    raise HFCheckpointError("export needs fully addressable params; on a multi-host mesh gather "
                            "them first (jax.experimental.multihost_utils.process_allgather)")
  if not idx:
    return np.asarray(jax.device_get(leaf))
  if all(d.platform == "cpu" for d in leaf.sharding.device_set):
    return layer_from_host_shards(leaf, idx[0])
  return layer_from_device(leaf, idx[0])


def export_hf(model: Any, cfg: ModelConfig, out: str | os.PathLike, *, arch: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = 4 << 30,
              hf_config: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes `model` (nnx module / State / pure dict) as an HF checkpoint dir at `out`, atomically.

  `arch`: "glm4_moe" or "qwen3_moe" (None: the original's, else inferred from cfg); `dtype` casts
  floating tensors (e.g. "bfloat16"); shards hold at most `max_shard_bytes` each (a bigger tensor
  gets its own). `hf_config`: the config.json the model was imported from; its other keys and
  spellings are kept (hf_names.merge_hf_config).
  """
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"export dir {out} exists and is not empty; choose a new --out")
  original = hf_config
  hf_config = hf_names.to_hf_config(cfg, arch or (original or {}).get("model_type"))
  if dtype is not None:
    hf_config["torch_dtype"] = dtype
  if original is not None:
    hf_config = hf_names.merge_hf_config(original, hf_config)
  tree = params_tree(model)
  specs = _matched_specs(cfg, tree)
  jobs = []  # (layer order, spec order, expert, spec, stack index, name)
  for order, spec in enumerate(specs):
    for idx, name in hf_names.expand(spec, _get(tree, spec.path).shape):
      layer = (spec.first_layer + idx[0]) if spec.first_layer is not None else (
          -1 if order == 0 else cfg.num_layers)
      jobs.append((layer, order, idx[1:] if spec.lead == 2 else (), spec, idx, name))
  jobs.sort(key=lambda j: j[:3])
  cast = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
  tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir(parents=True)
  try:
    writer = _ShardWriter(tmp, max_shard_bytes)
    cached: tuple[Any, np.ndarray] | None = None
    for _, _, _, spec, idx, name in jobs:
      key = (spec.path, idx[:1] if spec.lead == 2 else idx)
      if cached is None or cached[0] != key:
        cached = (key, _fetch(_get(tree, spec.path), key[1]))
      block = cached[1][idx[1:]] if spec.lead == 2 else cached[1]
      t = hf_names.ours_to_hf(spec, block)
      if (cast is not None and jax.numpy.issubdtype(t.dtype, jax.numpy.floating)
          and not name.endswith(_NO_CAST)):
        t = t.astype(cast)
      writer.add(name, t)
    index = writer.finish()
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if out.exists():
      out.rmdir()  # Empty (checked above); os.replace needs the name free.
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


save_hf = export_hf
load_hf = import_hf


# ---- CLI: HF dir <-> params-only Orbax policy checkpoint -------------------------------------

def parse_mesh(spec: str) -> dict[str, int]:
  """"fsdp:-1,expert:8" -> {"fsdp": -1, "expert": 8}; "" -> {} (no mesh)."""
  sizes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition(":")
    if not sep or not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh entry {part!r} is not axis:size (e.g. fsdp:-1,expert:8)")
    sizes[name] = int(size)
  return sizes


def _write_json_atomic(path: pathlib.Path, data: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.write_text(json.dumps(data, indent=1))
  os.replace(tmp, path)


def convert_import(import_dir: str | os.PathLike, out: str | os.PathLike, version: int = 0,
                   mesh: jax.sharding.Mesh | None = None, params_only: bool = False,
                   **overrides: Any) -> pathlib.Path:
  """HF dir -> `<out>/<version>` (reload.save_policy format) + `<out>/model_config.json`, and
  the original config.json as `<out>/hf_config.json` so that an export keeps its fields.

  The tree holds every model variable (Params and the router's ExpertBias) unless `params_only`,
  which drops the GLM router bias so that a reader restoring nnx.Param state only can load it.
  """
  from klong_jax.inference import reload
  model = import_hf(import_dir, mesh=mesh, **overrides)
  state = nnx.state(model, nnx.Param) if params_only else nnx.state(model)
  path = reload.save_policy(out, version, state.to_pure_dict())
  _write_json_atomic(pathlib.Path(out) / "model_config.json", dataclasses.asdict(model.cfg))
  _write_json_atomic(pathlib.Path(out) / ORIGINAL_CONFIG, read_hf_config(import_dir))
  return path


def original_hf_config(policy: str | os.PathLike) -> dict[str, Any] | None:
  """The config.json saved by `convert_import` for a policy root or version dir, if any."""
  path = pathlib.Path(policy)
  found = next((d / ORIGINAL_CONFIG for d in (path, path.parent)
                if (d / ORIGINAL_CONFIG).is_file()), None)
  return None if found is None else json.loads(found.read_text())


def load_policy_tree(policy: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
  """Restores a policy dir (or the newest version under a policy root) as a full pure tree.

  A Param-only checkpoint (trainer-published) restores with the router bias left at zeros.
  """
  from klong_jax.inference import reload
  path = pathlib.Path(policy)
  if not (path / "params").is_dir():
    latest = reload.latest_version(path)
    if latest is None:
      raise FileNotFoundError(f"{path} is neither a policy version dir nor a policy root with "
                              "versions; pass --policy=RUN/policy or RUN/policy/N")
    path = path / str(latest)
  _, state, _ = abstract_model(cfg)
  try:
    return reload.load_policy(path, state.to_pure_dict())
  except ValueError:  # Tree mismatch: try the Param-only layout.
    params = reload.load_policy(path, state.filter(nnx.Param).to_pure_dict())
    logging.warning("%s holds nnx.Param state only; the router bias is exported as zeros", path)
    tree = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.to_pure_dict())
    for p in _leaf_paths(params):
      _set(tree, p, _get(params, p))
    return tree


def convert_export(policy: str | os.PathLike, out: str | os.PathLike,
                   model_config: str | os.PathLike | None = None, **kwargs: Any) -> pathlib.Path:
  """Policy checkpoint -> HF dir; the ModelConfig comes from `model_config` (json) or
  `<policy root>/model_config.json`, the original config.json (if imported) from
  `<policy root>/hf_config.json`. `kwargs` go to `export_hf` (arch, dtype, max_shard_bytes)."""
  from klong_jax.model.config import from_config_dict
  policy = pathlib.Path(policy)
  candidates = [pathlib.Path(model_config)] if model_config else [
      policy / "model_config.json", policy.parent / "model_config.json"]
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    raise FileNotFoundError(f"no model config at {[str(c) for c in candidates]}; pass "
                            "--model_config=FILE.json (ModelConfig fields)")
  cfg = from_config_dict(json.loads(found.read_text()))
  kwargs.setdefault("hf_config", original_hf_config(policy))
  return export_hf(load_policy_tree(policy, cfg), cfg, out, **kwargs)


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.export:
    if not (FLAGS.policy and FLAGS.out):
      raise app.UsageError("--export needs --policy=RUN/policy[/N] and --out=HF_DIR")
    path = convert_export(FLAGS.policy, FLAGS.out, FLAGS.model_config, arch=FLAGS.arch,
                          dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
  else:
    if not (FLAGS.import_dir and FLAGS.out):
      raise app.UsageError("import needs --import_dir=HF_DIR and --out=RUN/policy")
    from klong_jax.parallel.mesh import make_mesh
    sizes = parse_mesh(FLAGS.mesh)
    mesh = make_mesh(sizes) if sizes else None
    overrides = {"param_dtype": FLAGS.dtype} if FLAGS.dtype else {}
    path = convert_import(FLAGS.import_dir, FLAGS.out, FLAGS.version, mesh, FLAGS.params_only,
                          **overrides)
  logging.info("wrote %s", path)
  print(path)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  flags.DEFINE_string("import_dir", None, "HF checkpoint dir (config.json + safetensors).")
  flags.DEFINE_string("out", None, "Import: policy root (writes <out>/<version>); export: HF dir.")
  flags.DEFINE_integer("version", 0, "Import: policy version number to write.")
  flags.DEFINE_string("mesh", "", "Import: mesh sizes, e.g. fsdp:-1,expert:8 (empty: 1 device).")
  flags.DEFINE_string("dtype", None, "Import: param dtype (default: config.json torch_dtype); "
                      "export: cast floating tensors to this dtype.")
  flags.DEFINE_bool("params_only", False, "Import: save nnx.Param state only (drops the GLM "
                    "router bias; for readers that restore Params only).")
  flags.DEFINE_bool("export", False, "Export a policy checkpoint to an HF dir instead.")
  flags.DEFINE_string("policy", None, "Export: policy root or version dir.")
  flags.DEFINE_string("model_config", None, "Export: ModelConfig json (default: "
                      "<policy root>/model_config.json).")
  flags.DEFINE_string("arch", None, "Export: glm4_moe or qwen3_moe (default: inferred).")
  flags.DEFINE_float("max_shard_gb", 4.0, "Export: max size of one safetensors shard (GiB).")
  app.run(main)

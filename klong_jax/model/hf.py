"""Import / export of HF safetensors checkpoints (GLM-4.5 `Glm4MoeForCausalLM`, Qwen3-MoE).

Import streams tensor by tensor: every param is built with `jax.make_array_from_callback`, whose
callback reads from the (mmapped) safetensors files only the window each addressable device holds,
so host memory peaks at about one device shard, never the whole model, and each host of a pod
reads only its own shards. The whole plan (missing / unknown tensors, shapes) is checked from
the file headers before any data is read. Export gathers one layer of one param at a time and
writes shards of bounded size plus `model.safetensors.index.json` and `config.json` into a temp
dir that is renamed into place.
HF dir <-> policy checkpoint conversion (the CLI) is `klong_jax.inference.hf_convert`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
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

def tree_get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def tree_set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out += leaf_paths(value, (*prefix, str(key)))
    else:
      out.append((*prefix, str(key)))
  return out


def _matched_specs(cfg: ModelConfig, tree: Mapping[str, Any]) -> list[TensorSpec]:
  """`tensor_specs(cfg)`, checked to cover exactly the leaves of the pure param `tree`."""
  specs = hf_names.tensor_specs(cfg)
  have = set(leaf_paths(tree))
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
    shape = tree_get(tree, spec.path).shape
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
      tree_set(tree, spec.path, _build(reader, spec, tree_get(tree, spec.path),
                                   tree_get(shardings, spec.path)))
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
    for idx, name in hf_names.expand(spec, tree_get(tree, spec.path).shape):
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
        cached = (key, _fetch(tree_get(tree, spec.path), key[1]))
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


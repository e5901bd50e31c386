"""HF safetensors dir <-> params-only Orbax policy checkpoint (what trainers and servers load).

  python -m klong_jax.inference.hf_convert --import_dir=HF_DIR --out=RUN/policy [--version=0] \
      [--mesh=fsdp:-1]
  python -m klong_jax.inference.hf_convert --export --policy=RUN/policy[/N] --out=HF_DIR \
      [--arch=glm4_moe]

The tensors go through `model.hf` (streamed import, layer-at-a-time export); the policy format is
`inference.reload`'s. The imported config.json is kept beside the versions so an export keeps its
fields, and the checkpoint's tokenizer and chat files (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json) go to `<policy root>/tokenizer/`, from where an
export (or `--tokenizer=DIR`) copies them into the HF dir, which then loads in transformers as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from klong_jax import fileio
from klong_jax.config_util import parse_mesh
from klong_jax.data import tokenizer as tokenizer_lib
from klong_jax.inference import reload
from klong_jax.model.config import ModelConfig, from_config_dict
from klong_jax.model.hf import (
  ORIGINAL_CONFIG,
  abstract_model,
  export_hf,
  import_hf,
  leaf_paths,
  read_hf_config,
  tree_get,
  tree_set,
)
from klong_jax.parallel.mesh import make_mesh

TOKENIZER_DIR = "tokenizer"  # beside the policy versions: the imported checkpoint's tokenizer


def convert_import(import_dir: str | os.PathLike, out: str | os.PathLike, version: int = 0,
                   mesh: jax.sharding.Mesh | None = None, params_only: bool = False,
                   **overrides: Any) -> pathlib.Path:
  """HF dir -> `<out>/<version>` (reload.save_policy format) + `<out>/model_config.json`, and
  the original config.json as `<out>/hf_config.json` so that an export keeps its fields.

  The tree holds every model variable (Params and the router's ExpertBias) unless `params_only`,
  which drops the GLM router bias so that a reader restoring nnx.Param state only can load it.
  """
  model = import_hf(import_dir, mesh=mesh, **overrides)
  state = nnx.state(model, nnx.Param) if params_only else nnx.state(model)
  path = reload.save_policy(out, version, state.to_pure_dict())
  fileio.atomic_write_json(pathlib.Path(out) / "model_config.json",
                           dataclasses.asdict(model.cfg), 1)
  fileio.atomic_write_json(pathlib.Path(out) / ORIGINAL_CONFIG, read_hf_config(import_dir), 1)
  if any((pathlib.Path(import_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
    tokenizer_lib.copy_tokenizer_files(import_dir, pathlib.Path(out) / TOKENIZER_DIR)
  return path


def policy_tokenizer(policy: str | os.PathLike) -> pathlib.Path | None:
  """The tokenizer dir saved by `convert_import` for a policy root or version dir, if any."""
  path = pathlib.Path(policy)
  return next((d / TOKENIZER_DIR for d in (path, path.parent)
               if (d / TOKENIZER_DIR).is_dir()), None)


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
    for p in leaf_paths(params):
      tree_set(tree, p, tree_get(params, p))
    return tree


def convert_export(policy: str | os.PathLike, out: str | os.PathLike,
                   model_config: str | os.PathLike | None = None,
                   tokenizer: str | os.PathLike | None = None, **kwargs: Any) -> pathlib.Path:
  """Policy checkpoint -> HF dir; the ModelConfig comes from `model_config` (json) or
  `<policy root>/model_config.json`, the original config.json (if imported) from
  `<policy root>/hf_config.json`, the tokenizer and chat files from `tokenizer` (a dir or file)
  or `<policy root>/tokenizer/`. `kwargs` go to `export_hf` (arch, dtype, max_shard_bytes)."""
  policy = pathlib.Path(policy)
  candidates = [pathlib.Path(model_config)] if model_config else [
      policy / "model_config.json", policy.parent / "model_config.json"]
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    raise FileNotFoundError(f"no model config at {[str(c) for c in candidates]}; pass "
                            "--model_config=FILE.json (ModelConfig fields)")
  cfg = from_config_dict(json.loads(found.read_text()))
  kwargs.setdefault("hf_config", original_hf_config(policy))
  tokenizer = tokenizer or policy_tokenizer(policy)
  path = export_hf(load_policy_tree(policy, cfg), cfg, out, **kwargs)
  if tokenizer is not None:
    tokenizer_lib.copy_tokenizer_files(tokenizer, path)
  else:
    logging.warning("no tokenizer for %s: pass --tokenizer=DIR so that %s loads in "
                    "transformers", policy, path)
  return path


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.export:
    if not (FLAGS.policy and FLAGS.out):
      raise app.UsageError("--export needs --policy=RUN/policy[/N] and --out=HF_DIR")
    path = convert_export(FLAGS.policy, FLAGS.out, FLAGS.model_config, FLAGS.tokenizer,
                          arch=FLAGS.arch,
                          dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
  else:
    if not (FLAGS.import_dir and FLAGS.out):
      raise app.UsageError("import needs --import_dir=HF_DIR and --out=RUN/policy")
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
  flags.DEFINE_string("tokenizer", None, "Export: tokenizer dir or file whose tokenizer and chat "
                      "files go into the HF dir (default: <policy root>/tokenizer).")
  flags.DEFINE_string("arch", None, "Export: glm4_moe or qwen3_moe (default: inferred).")
  flags.DEFINE_float("max_shard_gb", 4.0, "Export: max size of one safetensors shard (GiB).")
  app.run(main)

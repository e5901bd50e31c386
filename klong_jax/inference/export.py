"""Serving bundle export: params-only Orbax checkpoint (optionally bf16), model config, tokenizer
with its chat template — everything `server --bundle=DIR` needs, nothing else.

Layout of DIR (written to DIR.tmp-* and renamed, so a bundle dir is always complete):
  bundle.json          {"format": 1, "model_name", "chat_format", "tokenizer", "policy_version",
                        "dtype", "hf"}
  model_config.json    the ModelConfig fields
  tokenizer.model|json copy of the tokenizer file, with its chat files beside it:
  tokenizer_config.json, chat_template.jinja, generation_config.json (stop ids)
  policy/<version>/    params (reload.save_policy format); doubles as a hot-reload root
  hf/                  HF safetensors export (model.hf.export_hf; skipped with hf=False) with the
                       same tokenizer and chat files, so it loads in transformers/vLLM/SGLang as is

Usage: python -m klong_jax.inference.export --config=configs/serve_tiny.py \
         --policy=RUN/policy [--version=N] [--bf16] --out=DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from klong_jax.data import tokenizer as tokenizer_lib
from klong_jax.inference import hf_convert, reload, serve_config
from klong_jax.model import hf as hf_lib
from klong_jax.model.config import from_config_dict
from klong_jax.model.transformer import Transformer

BUNDLE_FORMAT = 1
CHAT_FORMATS = ("template", "klong")  # "template": the tokenizer dir's; "klong": older bundles


@dataclasses.dataclass
class Bundle:
  """A loaded bundle's parts (the model is built by the caller, e.g. the server)."""

  path: pathlib.Path
  model_config: Any
  tokenizer_path: pathlib.Path
  chat_format: str
  policy_root: pathlib.Path
  policy_version: int
  model_name: str
  dtype: str | None


def write_bundle(out: str | os.PathLike, model: Any, model_config: Any, tokenizer_path: str,
                 *, version: int = 0, bf16: bool = False, chat_format: str = "template",
                 model_name: str = "klong-tiny", hf: bool = True,
                 hf_config: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes a serving bundle for `model` (nnx module / State / params dict) to `out`.

  `hf_config`: the config.json the model was imported from; hf/config.json keeps its fields.
  """
  if chat_format not in CHAT_FORMATS:
    raise ValueError(f"chat format {chat_format!r} unknown; choose one of {CHAT_FORMATS}")
  tok = pathlib.Path(tokenizer_path)
  if not tok.exists():
    raise FileNotFoundError(f"tokenizer file {tok} does not exist")
  out = pathlib.Path(out)
  if out.exists():
    raise FileExistsError(f"bundle dir {out} exists; pick a new --out (bundles are immutable)")
  tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir(parents=True)
  try:
    reload.save_policy(tmp / "policy", version, model, dtype=jnp.bfloat16 if bf16 else None)
    cfg_dict = dataclasses.asdict(model_config)
    (tmp / "model_config.json").write_text(json.dumps(cfg_dict, indent=1))
    tok_name = tokenizer_lib.copy_tokenizer_files(tok, tmp)
    if hf:
      hf_lib.export_hf(model, model_config, str(tmp / "hf"), hf_config=hf_config)
      tokenizer_lib.copy_tokenizer_files(tmp / tok_name, tmp / "hf")
    meta = {"format": BUNDLE_FORMAT, "model_name": model_name, "chat_format": chat_format,
            "tokenizer": tok_name, "policy_version": int(version),
            "dtype": "bfloat16" if bf16 else None, "hf": bool(hf)}
    (tmp / "bundle.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def load_bundle(path: str | os.PathLike) -> Bundle:
  """Reads bundle.json and model_config.json; clear errors naming the missing piece."""
  path = pathlib.Path(path)
  meta_path = path / "bundle.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{path} is not a serving bundle (no bundle.json); create one with "
                            "python -m klong_jax.inference.export")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != BUNDLE_FORMAT:
    raise ValueError(f"bundle {path} has format {meta.get('format')!r}; expected {BUNDLE_FORMAT}")
  cfg = from_config_dict(json.loads((path / "model_config.json").read_text()))
  return Bundle(path=path, model_config=cfg, tokenizer_path=path / meta["tokenizer"],
                chat_format=meta["chat_format"], policy_root=path / "policy",
                policy_version=int(meta["policy_version"]), model_name=meta["model_name"],
                dtype=meta.get("dtype"))


# ---- CLI -----------------------------------------------------------------------------------

def export_from_config(config: Any, out: str, policy: str | None = None,
                       version: int | None = None, bf16: bool = False,
                       tokenizer_path: str | None = None, model_name: str | None = None,
                       seed: int = 0) -> pathlib.Path:
  """Builds the model from `config.model`, loads the policy (if any), writes the bundle."""


  cfg = from_config_dict(config.model)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  v, hf_config = 0, None
  if policy:
    root = pathlib.Path(policy)
    if (root / "params").is_dir():
      path, v = root, int(root.name) if root.name.isdigit() else 0
    else:
      v = version if version is not None else reload.latest_version(root)
      if v is None:
        raise FileNotFoundError(f"no policy versions under {root}")
      path = root / str(v)
    state = nnx.state(model, nnx.Not(nnx.RngState))
    state.replace_by_pure_dict(reload.load_policy(path, model))
    nnx.update(model, state)
    hf_config = hf_convert.original_hf_config(path)
  if tokenizer_path is None:
    cache = serve_config.resolve(config).tokenizer_cache
    tokenizer_path = tokenizer_lib.default_tokenizer(cache, vocab_size=cfg.vocab_size).path
  name = model_name or serve_config.resolve(config).model_name
  return write_bundle(out, model, cfg, str(tokenizer_path), version=v, bf16=bf16,
                      model_name=name, hf_config=hf_config)


def _define_flags() -> None:
  """CLI flags, defined at entry time so importing this module defines none (the server does)."""
  config_flags.DEFINE_config_file("config", None, "Config with a `model` section.")
  flags.DEFINE_string("policy", None, "Policy root (<run>/policy) or one version dir; omit to "
                      "export freshly initialised weights (demo/testing).")
  flags.DEFINE_integer("version", None, "Version under --policy (default: newest).")
  flags.DEFINE_string("out", None, "Bundle directory to create.")
  flags.DEFINE_bool("bf16", False, "Store params as bfloat16.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer dir or file (default: the bundled one).")
  flags.DEFINE_string("model_name", None, "Served model name (default: serve.model_name).")
  flags.DEFINE_integer("seed", 0, "Init seed when --policy is not given.")


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.config is None or not f.out:
    raise app.UsageError("--config and --out are required")
  path = export_from_config(f.config, f.out, f.policy, f.version, f.bf16, f.tokenizer,
                            f.model_name, f.seed)
  logging.info("wrote serving bundle %s", path)
  print(path)


def entry() -> None:
  """Console script `klong-export`."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

"""HF safetensors interop: round trips, logits against an HF-semantics numpy forward, errors that
name the tensor, sharded (8 fake devices) import, config.json mapping, and the CLI."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from klong_jax.inference import hf_convert
from klong_jax.model import hf, hf_names
from klong_jax.model.config import ConfigError, get_preset
from klong_jax.parallel.mesh import make_mesh

GLM = get_preset("tiny")
QWEN = get_preset("qwen3_moe").replace(
    vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
    first_k_dense=0, rope_theta=1e4, dtype="float32", param_dtype="float32")
CONFIGS = {"glm": GLM, "qwen": QWEN}


def _random_model(cfg, seed=0):
  """A model whose every variable (norms, biases, router bias included) is random, not 0/1.

  Built from abstract shapes, so no initialiser runs (eager init is slow on a busy CPU).
  """
  graphdef, state, _ = hf.abstract_model(cfg)
  rng = np.random.default_rng(seed)
  state.replace_by_pure_dict(jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state.to_pure_dict()))
  return nnx.merge(graphdef, state)


_logits = nnx.jit(lambda model, tokens, positions: model(tokens, positions)[0])


def _tree_equal(a, b):
  a, b = hf.params_tree(a), hf.params_tree(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """name -> (cfg, random model, HF dir exported in 64 KiB shards), built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg = CONFIGS[name]
      model = _random_model(cfg)
      out = hf.export_hf(model, cfg, tmp_path_factory.mktemp(name) / "hf",
                         max_shard_bytes=64 << 10)
      cache[name] = cfg, model, out
    return cache[name]

  return get


@pytest.fixture(params=sorted(CONFIGS))
def exported(request, exports):
  return exports(request.param)


def test_round_trip_identical(exported):
  cfg, model, out = exported
  index = json.loads((out / hf.INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
  sizes = [sum(a.nbytes for a in load_file(out / f).values()) for f in files]
  assert sum(sizes) == index["metadata"]["total_size"]
  for size, f in zip(sizes, files, strict=True):
    assert size <= 64 << 10 or len(load_file(out / f)) == 1
  imported = hf.import_hf(out)
  assert imported.cfg == cfg
  _tree_equal(model, imported)


# ---- an independent forward written from the HF modeling code, on the HF-named tensors ----

def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, rot, theta):  # x [T, N, H]; GPT-NeoX rotate_half on the first `rot` dims.
  inv = 1.0 / theta ** (np.arange(0, rot, 2) / rot)
  freqs = np.arange(x.shape[0])[:, None] * inv
  emb = np.concatenate([freqs, freqs], -1)[:, None, :]
  xr = x[..., :rot]
  rotated = np.concatenate([-xr[..., rot // 2:], xr[..., :rot // 2]], -1)
  return np.concatenate([xr * np.cos(emb) + rotated * np.sin(emb), x[..., rot:]], -1)


def _hf_forward(t, c, tokens):
  """Glm4Moe / Qwen3Moe forward in float64 numpy, from HF tensors `t` and config.json `c`."""
  get = lambda name: t[name].astype(np.float64)  # noqa: E731
  eps, n, kv, hd = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"], \
      c["head_dim"]
  glm = c["model_type"] == "glm4_moe"
  rot = int(hd * c.get("partial_rotary_factor", 1.0))
  dense = c["first_k_dense_replace"] if glm else len(c["mlp_only_layers"])
  mlp = lambda p, h: (  # noqa: E731
      (lambda g: g / (1 + np.exp(-g)))(h @ get(p + "gate_proj.weight").T)
      * (h @ get(p + "up_proj.weight").T)) @ get(p + "down_proj.weight").T
  x = get("model.embed_tokens.weight")[tokens]
  length = len(tokens)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms(x, get(p + "input_layernorm.weight"), eps)
    proj = {}
    for name, heads in (("q", n), ("k", kv), ("v", kv)):
      y = h @ get(p + f"self_attn.{name}_proj.weight").T
      if c["attention_bias"]:
        y = y + get(p + f"self_attn.{name}_proj.bias")
      y = y.reshape(length, heads, hd)
      if name != "v" and (c.get("use_qk_norm") or not glm):
        y = _rms(y, get(p + f"self_attn.{name}_norm.weight"), eps)
      proj[name] = _rope(y, rot, c["rope_theta"]) if name != "v" else y
    k = np.repeat(proj["k"], n // kv, axis=1)
    v = np.repeat(proj["v"], n // kv, axis=1)
    s = np.einsum("tnh,snh->nts", proj["q"], k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", a, v).reshape(length, n * hd)
    x = x + o @ get(p + "self_attn.o_proj.weight").T
    h = _rms(x, get(p + "post_attention_layernorm.weight"), eps)
    if i < dense:
      x = x + mlp(p + "mlp.", h)
      continue
    logits = h @ get(p + "mlp.gate.weight").T
    if glm:
      scores = 1 / (1 + np.exp(-logits))
      choice = scores + get(p + "mlp.gate.e_score_correction_bias")
    else:
      scores = np.exp(logits - logits.max(-1, keepdims=True))
      scores = choice = scores / scores.sum(-1, keepdims=True)
    y = np.zeros_like(h)
    for tok in range(length):
      top = np.argsort(-choice[tok])[:c["num_experts_per_tok"]]
      w = scores[tok, top]
      if c["norm_topk_prob"]:
        w = w / w.sum()
      w = w * c.get("routed_scaling_factor", 1.0)
      for e, we in zip(top, w, strict=True):
        y[tok] += we * mlp(p + f"mlp.experts.{e}.", h[tok])
    if glm:
      y = y + mlp(p + "mlp.shared_experts.", h)
    x = x + y
  x = _rms(x, get("model.norm.weight"), eps)
  return x @ get("lm_head.weight").T


def test_logits_match_hf_reference(exported):
  cfg, model, out = exported
  tensors = {}
  for f in out.glob("*.safetensors"):
    tensors.update(load_file(f))
  c = json.loads((out / "config.json").read_text())
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (8,))
  ref = _hf_forward(tensors, c, tokens)
  positions = jnp.arange(8)[None]
  ours = np.asarray(_logits(model, jnp.asarray(tokens)[None], positions))
  np.testing.assert_allclose(ours[0], ref, rtol=2e-4, atol=2e-4)
  imported = _logits(hf.import_hf(out), jnp.asarray(tokens)[None], positions)
  np.testing.assert_array_equal(np.asarray(imported), ours)


# ---- errors name the tensor ----------------------------------------------------------------

def _single_file(src, dst, edit, config_edit=None):
  """Copies an HF dir as one model.safetensors after `edit(tensors)`; returns the dir."""
  tensors = {}
  for f in src.glob("*.safetensors"):
    tensors.update(load_file(f))
  edit(tensors)
  dst.mkdir()
  save_file(tensors, str(dst / "model.safetensors"))
  c = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**c, **(config_edit or {})}))
  return dst


def test_errors_name_the_tensor(tmp_path):
  model = _random_model(GLM)
  src = hf.export_hf(model, GLM, tmp_path / "hf")
  name = "model.layers.2.mlp.experts.5.up_proj.weight"
  shape = (GLM.moe_intermediate_size, GLM.hidden_size)

  bad = _single_file(src, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(hf_names.HFCheckpointError, match=rf"{name}.*expected shape \({shape[0]}"):
    hf.import_hf(bad)

  extra = "model.layers.1.mlp.experts.99.up_proj.weight"
  bad = _single_file(src, tmp_path / "unknown", lambda t: t.update({extra: t[name]}))
  with pytest.raises(hf_names.HFCheckpointError, match=rf"{extra}.*unknown"):
    hf.import_hf(bad)

  bad = _single_file(src, tmp_path / "shape", lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(hf_names.HFCheckpointError, match=rf"{name}.*shape \(31, 64\).*expected"):
    hf.import_hf(bad)

  # GLM's multi-token-prediction layer (index num_hidden_layers) is skipped only when declared.
  mtp = "model.layers.3.eh_proj.weight"
  add_mtp = lambda t: t.update({mtp: np.ones((4, 4), np.float32)})  # noqa: E731
  with pytest.raises(hf_names.HFCheckpointError, match=mtp):
    hf.import_hf(_single_file(src, tmp_path / "mtp_bad", add_mtp))
  ok = _single_file(src, tmp_path / "mtp_ok", add_mtp, {"num_nextn_predict_layers": 1})
  _tree_equal(model, hf.import_hf(ok))

  with pytest.raises(FileExistsError, match="not empty"):
    hf.export_hf(model, GLM, src)
  with pytest.raises(ConfigError, match="router_score"):
    hf.export_hf(model, GLM, tmp_path / "as_qwen", arch="qwen3_moe")
  assert not (tmp_path / "as_qwen").exists()


def test_bf16_export_import(tmp_path):
  model = _random_model(QWEN)
  out = hf.export_hf(model, QWEN, tmp_path / "hf", dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  imported = hf.import_hf(out)
  assert imported.cfg.param_dtype == "bfloat16"
  want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), hf.params_tree(model))
  _tree_equal(want, imported)


# ---- sharded import --------------------------------------------------------------------------

@pytest.mark.parametrize("name,sizes,specs", [
    ("glm", {"fsdp": 2, "expert": 2, "tensor": 2},
     {("moe_layers", "mlp", "gate_edf"): P(None, "expert", "fsdp", "tensor"),
      ("moe_layers", "attn", "q_dnh"): P(None, "fsdp", "tensor", None),
      ("embedder", "embed_vd"): P("tensor", "fsdp")}),
    ("qwen", {"data": 2, "expert": 4},
     {("moe_layers", "mlp", "down_efd"): P(None, "expert", None, None),
      ("moe_layers", "attn", "q_dnh"): P()})])
def test_sharded_import_matches(exports, name, sizes, specs):
  """Import straight onto 8 devices: same values, placed per the logical-axis rules table."""
  cfg, model, out = exports(name)
  mesh = make_mesh(sizes, jax.devices()[:8])
  imported = hf.import_hf(out, mesh=mesh)
  _tree_equal(model, imported)
  tree = hf.params_tree(imported)
  for path, spec in specs.items():
    leaf = hf.tree_get(tree, path)
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path
  again = hf.export_hf(imported, cfg, out.parent / f"again-{name}")  # Export from shards, too.
  _tree_equal(model, hf.import_hf(again))


def test_layer_fetch_paths_agree():
  """Export's two ways to pull one layer to host (CPU shard copy, accelerator jitted slice)."""
  mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}, jax.devices()[:8])
  x = np.arange(3 * 4 * 8 * 2, dtype=np.float32).reshape(3, 4, 8, 2)
  leaf = jax.device_put(x, NamedSharding(mesh, P(None, "expert", ("fsdp", "tensor"))))
  for i in range(3):
    np.testing.assert_array_equal(hf.layer_from_host_shards(leaf, i), x[i])
    np.testing.assert_array_equal(hf.layer_from_device(leaf, i), x[i])


def test_read_slice_windows():
  """A window read through HF slices equals the same window of the whole converted tensor."""
  rng = np.random.default_rng(3)
  spec = hf_names.TensorSpec(("x",), "t", "n h d", "d (n h)")
  ours = rng.normal(size=(4, 6, 5))
  t = hf_names.ours_to_hf(spec, ours)
  assert t.shape == (5, 24)
  np.testing.assert_array_equal(hf_names.hf_to_ours(spec, t, ours.shape), ours)
  reads = []

  def read(sl):
    reads.append(sl)
    return t[sl]

  for _ in range(20):
    win = [tuple(sorted(rng.choice(n + 1, 2, replace=False))) for n in ours.shape]
    got = hf_names.read_slice(spec, read, ours.shape, win)
    np.testing.assert_array_equal(got, ours[tuple(slice(*w) for w in win)])
    (lo, hi) = win[0]
    assert reads[-1][1] == slice(lo * 6, hi * 6)  # Only the window's heads are read.


# ---- config.json ---------------------------------------------------------------------------

GLM45_AIR_CONFIG = {  # The published zai-org/GLM-4.5-Air config.json (main fields).
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 10944, "max_position_embeddings": 131072, "model_type": "glm4_moe",
    "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8,
    "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 1000000, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
    "topk_group": 1, "torch_dtype": "bfloat16", "use_qk_norm": False, "vocab_size": 151552}
QWEN3_30B_CONFIG = {  # The published Qwen/Qwen3-30B-A3B config.json (main fields).
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1e6,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("preset,hf_config", [("glm45_air", GLM45_AIR_CONFIG),
                                              ("qwen3_moe", QWEN3_30B_CONFIG)])
def test_published_configs_map_to_presets(preset, hf_config):
  want = get_preset(preset).replace(param_dtype="bfloat16")
  assert hf_names.from_hf_config(hf_config) == want
  assert hf_names.from_hf_config(hf_names.to_hf_config(want)) == want


def test_glm45_air_hf_shapes():
  """The HF tensor shapes the plan expects for GLM-4.5-Air (from eval_shape, nothing allocated)."""
  cfg = get_preset("glm45_air")
  _, state, _ = hf.abstract_model(cfg)
  tree = state.to_pure_dict()
  shapes = {}
  for spec in hf_names.tensor_specs(cfg):
    full = hf.tree_get(tree, spec.path).shape
    for _, name in hf_names.expand(spec, full):
      shapes[name] = hf_names.hf_shape(spec, full[spec.lead:])
  assert shapes["model.embed_tokens.weight"] == (151552, 4096)
  assert shapes["model.layers.0.self_attn.q_proj.weight"] == (12288, 4096)
  assert shapes["model.layers.0.self_attn.k_proj.bias"] == (1024,)
  assert shapes["model.layers.45.self_attn.o_proj.weight"] == (4096, 12288)
  assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 10944)
  assert shapes["model.layers.1.mlp.gate.weight"] == (128, 4096)
  assert shapes["model.layers.45.mlp.experts.127.gate_proj.weight"] == (1408, 4096)
  assert shapes["model.layers.1.mlp.shared_experts.down_proj.weight"] == (4096, 1408)
  assert "model.layers.46.input_layernorm.weight" not in shapes
  assert len([n for n in shapes if ".experts." in n]) == 45 * 128 * 3


@pytest.mark.parametrize("field,edit", [("n_group", {"n_group": 8, "topk_group": 4}),
                                        ("rope_scaling", {"rope_scaling": {"rope_type": "yarn"}}),
                                        ("model_type", {"model_type": "llama"}),
                                        ("num_experts_per_tok", {"num_experts_per_tok": 300})])
def test_unsupported_configs_name_the_field(field, edit):
  with pytest.raises(ConfigError, match=field):
    hf_names.from_hf_config({**GLM45_AIR_CONFIG, **edit})


def test_qwen_dense_layers_must_be_a_prefix():
  with pytest.raises(ConfigError, match="mlp_only_layers"):
    hf_names.from_hf_config({**QWEN3_30B_CONFIG, "mlp_only_layers": [3]})
  assert hf_names.from_hf_config({**QWEN3_30B_CONFIG, "mlp_only_layers": [0, 1]}).first_k_dense == 2


# ---- CLI -----------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_cli_import_then_export(exports, tmp_path):
  cfg, model, out = exports("glm")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-m", "klong_jax.inference.hf_convert",
                        f"--import_dir={out}", f"--out={tmp_path / 'policy'}", "--version=3"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert (tmp_path / "policy" / "3" / "params").is_dir()
  assert (tmp_path / "policy" / "model_config.json").is_file()
  back = hf_convert.convert_export(tmp_path / "policy", tmp_path / "hf2")
  old, new = {}, {}
  for d, acc in ((out, old), (back, new)):
    for f in pathlib.Path(d).glob("*.safetensors"):
      acc.update(load_file(f))
  assert sorted(old) == sorted(new)
  for name in old:
    np.testing.assert_array_equal(old[name], new[name], err_msg=name)


# ---- transformers 5 config.json spellings, and keeping the original config on export --------

def _transformers5(c):
  """`c` as transformers 5 writes it: num_local_experts, rope_parameters, dtype."""
  c = dict(c)
  experts = c.pop("num_experts", None) or c.pop("n_routed_experts")
  rope = {"rope_type": "default", "rope_theta": c.pop("rope_theta")}
  if "partial_rotary_factor" in c:
    rope["partial_rotary_factor"] = c.pop("partial_rotary_factor")
  c.pop("rope_scaling", None)
  dtype = c.pop("torch_dtype")
  return {**c, "num_local_experts": experts, "rope_parameters": rope, "dtype": dtype}


@pytest.mark.parametrize("preset,hf_config", [("glm45_air", GLM45_AIR_CONFIG),
                                              ("qwen3_moe", QWEN3_30B_CONFIG)])
def test_transformers5_configs_map_to_presets(preset, hf_config):
  v5 = _transformers5(hf_config)
  assert "num_experts" not in v5 and "n_routed_experts" not in v5 and "rope_theta" not in v5
  assert hf_names.from_hf_config(v5) == get_preset(preset).replace(param_dtype="bfloat16")
  with pytest.raises(ConfigError, match="rope_parameters.*yarn"):
    hf_names.from_hf_config({**v5, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_overrides_supply_fields_the_config_lacks():
  with pytest.raises(ConfigError, match="num_experts.*nor num_local_experts.*override"):
    hf_names.from_hf_config({k: v for k, v in QWEN3_30B_CONFIG.items() if k != "num_experts"})
  c = {k: v for k, v in QWEN3_30B_CONFIG.items() if k not in ("num_experts",
                                                              "moe_intermediate_size")}
  got = hf_names.from_hf_config(c, num_experts=128, moe_intermediate_size=768)
  assert got == get_preset("qwen3_moe").replace(param_dtype="bfloat16")


@pytest.mark.parametrize("name", ["glm", "qwen"])
def test_export_keeps_the_original_config_json(exports, tmp_path, name):
  """import (transformers-5 config.json) -> policy -> export: the same config.json comes back."""
  import ml_collections

  from klong_jax.inference import export

  cfg, model, out = exports(name)
  original = {**_transformers5(hf_names.to_hf_config(cfg)), "max_position_embeddings": 4096,
              "num_nextn_predict_layers": 1, "future_field": {"x": [1, 2]}}
  src = tmp_path / "src"
  src.mkdir()
  for f in [*out.glob("*.safetensors"), out / hf.INDEX]:
    (src / f.name).write_bytes(f.read_bytes())
  (src / "config.json").write_text(json.dumps(original))
  imported = hf.import_hf(src)
  assert imported.cfg == cfg
  hf_convert.convert_import(src, tmp_path / "policy")
  back = hf_convert.convert_export(tmp_path / "policy", tmp_path / "back")
  exported = json.loads((back / "config.json").read_text())
  assert exported == original
  assert hf_names.from_hf_config(exported) == cfg
  cast = hf.export_hf(imported, cfg, tmp_path / "bf16", dtype="bfloat16", hf_config=original)
  cast_cfg = json.loads((cast / "config.json").read_text())
  assert cast_cfg["dtype"] == "bfloat16" and "torch_dtype" not in cast_cfg
  assert {k: v for k, v in cast_cfg.items() if k != "dtype"} == \
      {k: v for k, v in original.items() if k != "dtype"}
  with pytest.raises(ConfigError, match="model_type.*'llama'"):
    hf.export_hf(imported, cfg, tmp_path / "other", arch=hf_names.infer_arch(cfg),
                 hf_config={**original, "model_type": "llama"})
  # A serving bundle of the imported policy carries the same config.json in hf/.
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"not read")
  bundle = export.export_from_config(
      ml_collections.ConfigDict({"model": dataclasses.asdict(cfg)}), str(tmp_path / "bundle"),
      policy=str(tmp_path / "policy"), tokenizer_path=str(tok), model_name="m")
  assert json.loads((bundle / "hf" / "config.json").read_text()) == original

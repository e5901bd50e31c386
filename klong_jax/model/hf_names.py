"""HF (transformers) checkpoint naming for GLM-4.5 / Qwen3-MoE, and config.json <-> ModelConfig.

Pure data and numpy, no JAX: `tensor_specs(cfg)` lists, for every one of our parameters, the HF
tensor name template and how its dims map (einops-like patterns, e.g. our `q_dnh` "d n h" is HF
`q_proj.weight` "(n h) d"); `hf_to_ours`/`ours_to_hf` move one tensor between the layouts and
`read_slice` reads just one index window of ours from an HF tensor slice reader (so a sharded
import reads only each device's part). Both families share the per-layer names (`self_attn.*`,
`mlp.gate`, `mlp.experts.E.*`); GLM adds `mlp.shared_experts` and
`mlp.gate.e_score_correction_bias`, Qwen3 adds `self_attn.{q,k}_norm` (GLM too when `use_qk_norm`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from klong_jax.model.config import ConfigError, ModelConfig

ARCHS = {"glm4_moe": "Glm4MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
Path = tuple[str, ...]
_LAYER = "model.layers.{layer}."


class HFCheckpointError(ValueError):
  """A checkpoint that does not fit the model; the message names the tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One of our params and the HF tensor(s) it is stacked from.

  Our full shape is [layers?] + [experts?] + per-tensor dims (`ours`); HF tensor
  `template.format(layer=first_layer + i, expert=j)` has dims `hf` (groups in parentheses are
  flattened in row-major order).
  """

  path: Path
  template: str
  ours: str
  hf: str
  first_layer: int | None = None  # None: not stacked over layers.
  experts: bool = False

  @property
  def lead(self) -> int:
    """Number of stacking axes in front of the per-tensor dims."""
    return int(self.first_layer is not None) + int(self.experts)


def _groups(pattern: str) -> list[list[str]]:
  """"(n h) d" -> [["n", "h"], ["d"]]: one list of letters per HF dim."""
  out = []
  for group, single in re.findall(r"\(([a-z ]+)\)|([a-z])", pattern):
    out.append(group.split() if group else [single])
  return out


def _sizes(spec: TensorSpec, shape: Sequence[int]) -> dict[str, int]:
  letters = spec.ours.split()
  if len(letters) != len(shape):
    raise HFCheckpointError(f"{'/'.join(spec.path)}: pattern {spec.ours!r} does not fit shape "
                            f"{tuple(shape)}")
  return dict(zip(letters, shape, strict=True))


def hf_shape(spec: TensorSpec, per_tensor_shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of the HF tensor holding one per-tensor slice of shape `per_tensor_shape`."""
  sizes = _sizes(spec, per_tensor_shape)
  return tuple(math.prod(sizes[a] for a in g) for g in _groups(spec.hf))


def ours_to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """One per-tensor array in our layout -> the HF tensor (transpose, then merge groups)."""
  letters = spec.ours.split()
  groups = _groups(spec.hf)
  order = [letters.index(a) for g in groups for a in g]
  return np.ascontiguousarray(np.transpose(x, order)).reshape(hf_shape(spec, x.shape))


def hf_to_ours(spec: TensorSpec, t: np.ndarray, per_tensor_shape: Sequence[int]) -> np.ndarray:
  """Inverse of `ours_to_hf`: an HF tensor -> our per-tensor layout."""
  full = [(0, n) for n in per_tensor_shape]
  return read_slice(spec, lambda idx: t[idx], per_tensor_shape, full)


def read_slice(spec: TensorSpec, read: Callable[[tuple[slice, ...]], np.ndarray],
               per_tensor_shape: Sequence[int], window: Sequence[tuple[int, int]]) -> np.ndarray:
  """Window [(start, stop) per our dim] of our per-tensor array, read from HF via `read(slices)`.

  Each HF dim is read over the rows of its group's outermost letter only (inner letters of a
  group are read whole, then cut), so e.g. a tensor-parallel shard of heads reads its heads only.
  """
  sizes = _sizes(spec, per_tensor_shape)
  letters = spec.ours.split()
  win = dict(zip(letters, window, strict=True))
  hf_slices, shape, cuts, flat = [], [], [], []
  for g in _groups(spec.hf):
    inner = math.prod(sizes[a] for a in g[1:])
    lo, hi = win[g[0]]
    hf_slices.append(slice(lo * inner, hi * inner))
    shape += [hi - lo] + [sizes[a] for a in g[1:]]
    cuts += [slice(None)] + [slice(*win[a]) for a in g[1:]]
    flat += g
  block = np.asarray(read(tuple(hf_slices))).reshape(shape)[tuple(cuts)]
  return np.transpose(block, [flat.index(a) for a in letters])


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every parameter of `Transformer(cfg)` with its HF name template and dim mapping."""
  specs = [TensorSpec(("embedder", "embed_vd"), "model.embed_tokens.weight", "v d", "v d")]
  for stack, first, moe in (("dense_layers", 0, False), ("moe_layers", cfg.first_k_dense, True)):
    count = cfg.first_k_dense if not moe else cfg.num_moe_layers
    if count == 0:
      continue

    def add(path: Sequence[str], name: str, ours: str, hf: str, experts: bool = False,
            stack: str = stack, first: int = first) -> None:
      specs.append(TensorSpec((stack, *path), _LAYER + name, ours, hf, first, experts))

    add(("input_layernorm", "scale_d"), "input_layernorm.weight", "d", "d")
    add(("post_attention_layernorm", "scale_d"), "post_attention_layernorm.weight", "d", "d")
    att = "self_attn."
    add(("attn", "q_dnh"), att + "q_proj.weight", "d n h", "(n h) d")
    add(("attn", "k_dkh"), att + "k_proj.weight", "d k h", "(k h) d")
    add(("attn", "v_dkh"), att + "v_proj.weight", "d k h", "(k h) d")
    add(("attn", "o_nhd"), att + "o_proj.weight", "n h d", "d (n h)")
    if cfg.qkv_bias:
      add(("attn", "q_bias_nh"), att + "q_proj.bias", "n h", "(n h)")
      add(("attn", "k_bias_kh"), att + "k_proj.bias", "k h", "(k h)")
      add(("attn", "v_bias_kh"), att + "v_proj.bias", "k h", "(k h)")
    if cfg.qk_norm:
      add(("attn", "q_norm", "scale_d"), att + "q_norm.weight", "h", "h")
      add(("attn", "k_norm", "scale_d"), att + "k_norm.weight", "h", "h")
    mlps = [(("mlp",), "mlp.")]
    if moe:
      add(("mlp", "router_de"), "mlp.gate.weight", "d e", "e d")
      if cfg.router_bias:
        add(("mlp", "expert_bias_e"), "mlp.gate.e_score_correction_bias", "e", "e")
      ex = "mlp.experts.{expert}."
      add(("mlp", "gate_edf"), ex + "gate_proj.weight", "d f", "f d", experts=True)
      add(("mlp", "up_edf"), ex + "up_proj.weight", "d f", "f d", experts=True)
      add(("mlp", "down_efd"), ex + "down_proj.weight", "f d", "d f", experts=True)
      mlps = [(("mlp", "shared"), "mlp.shared_experts.")] if cfg.num_shared_experts else []
    for path, name in mlps:
      add((*path, "gate_df"), name + "gate_proj.weight", "d f", "f d")
      add((*path, "up_df"), name + "up_proj.weight", "d f", "f d")
      add((*path, "down_fd"), name + "down_proj.weight", "f d", "d f")
  specs.append(TensorSpec(("final_norm", "scale_d"), "model.norm.weight", "d", "d"))
  if not cfg.tie_embeddings:
    specs.append(TensorSpec(("embedder", "lm_head_dv"), "lm_head.weight", "d v", "v d"))
  return specs


def hf_name(spec: TensorSpec, idx: Sequence[int]) -> str:
  """HF name of the tensor at stack index `idx` ([layer?, expert?]) of `spec`'s param."""
  layer = spec.first_layer + int(idx[0]) if spec.first_layer is not None else None
  expert = int(idx[-1]) if spec.experts else None
  return spec.template.format(layer=layer, expert=expert)


def expand(spec: TensorSpec, full_shape: Sequence[int]) -> Iterator[tuple[tuple[int, ...], str]]:
  """(stack index, HF name) for every HF tensor that `spec`'s param of `full_shape` holds."""
  for idx in np.ndindex(*full_shape[:spec.lead]):
    idx = tuple(int(i) for i in idx)
    yield idx, hf_name(spec, idx)


def ignored(name: str, hf_config: Mapping[str, Any]) -> bool:
  """HF tensors we knowingly skip: GLM's multi-token-prediction layers and rotary buffers."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  m = re.match(r"model\.layers\.(\d+)\.", name)
  nextn = int(hf_config.get("num_nextn_predict_layers", 0) or 0)
  layers = int(hf_config.get("num_hidden_layers", 0))
  return bool(m) and nextn > 0 and layers <= int(m.group(1)) < layers + nextn


# ---- config.json ---------------------------------------------------------------------------

def infer_arch(cfg: ModelConfig) -> str:
  """"qwen3_moe" for softmax routing without bias / shared experts, else "glm4_moe"."""
  if cfg.router_score == "softmax" and not cfg.router_bias and not cfg.num_shared_experts:
    return "qwen3_moe"
  return "glm4_moe"


def _need(cfg: ModelConfig, arch: str, field: str, ok: bool, want: str) -> None:
  if not ok:
    raise ConfigError(field, f"{getattr(cfg, field)!r} cannot be written as HF {arch}: it needs "
                      f"{want}; export with the other arch or change the model")


def to_hf_config(cfg: ModelConfig, arch: str | None = None, max_positions: int = 131072
                 ) -> dict[str, Any]:
  """HF config.json dict for `cfg` as `arch` ("glm4_moe" or "qwen3_moe"; None = infer)."""
  arch = arch or infer_arch(cfg)
  if arch not in ARCHS:
    raise ConfigError("arch", f"{arch!r} not in {tuple(ARCHS)}")
  out: dict[str, Any] = {
      "architectures": [ARCHS[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": max_positions,
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0,
      "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "torch_dtype": cfg.param_dtype, "use_cache": True}
  if arch == "glm4_moe":
    _need(cfg, arch, "router_score", cfg.router_score == "sigmoid", "'sigmoid'")
    _need(cfg, arch, "router_bias", cfg.router_bias, "True (e_score_correction_bias)")
    _need(cfg, arch, "num_shared_experts", cfg.num_shared_experts > 0, ">= 1")
    _need(cfg, arch, "first_k_dense", cfg.first_k_dense < cfg.num_layers, "< num_layers")
    out.update(n_routed_experts=cfg.num_experts, n_shared_experts=cfg.num_shared_experts,
               first_k_dense_replace=cfg.first_k_dense, n_group=1, topk_group=1,
               routed_scaling_factor=cfg.routed_scaling_factor, use_qk_norm=cfg.qk_norm,
               partial_rotary_factor=cfg.partial_rotary_factor, num_nextn_predict_layers=0)
  else:
    _need(cfg, arch, "router_score", cfg.router_score == "softmax", "'softmax'")
    _need(cfg, arch, "router_bias", not cfg.router_bias, "False")
    _need(cfg, arch, "num_shared_experts", cfg.num_shared_experts == 0, "0")
    _need(cfg, arch, "qk_norm", cfg.qk_norm, "True")
    _need(cfg, arch, "partial_rotary_factor", cfg.partial_rotary_factor == 1.0, "1.0")
    _need(cfg, arch, "routed_scaling_factor", cfg.routed_scaling_factor == 1.0, "1.0")
    out.update(num_experts=cfg.num_experts, decoder_sparse_step=1,
               mlp_only_layers=list(range(cfg.first_k_dense)), use_sliding_window=False,
               sliding_window=None, router_aux_loss_coef=cfg.lb_loss_coef,
               output_router_logits=False)
  return out


def _get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
  for name in names:
    if hf.get(name) is not None:
      return hf[name]
  if default is None:
    also = f" (nor {' / '.join(names[1:])})" if names[1:] else ""
    raise ConfigError(names[0], f"missing from the HF config.json{also}; add it there or pass "
                      "the ModelConfig field as an override")
  return default


def _check(ok: bool, field: str, reason: str) -> None:
  if not ok:
    raise ConfigError(field, f"HF config.json value is not supported: {reason}")


# Spellings of one config.json field: ours first, then other transformers versions' (transformers
# 5 writes Qwen3-MoE's expert count as num_local_experts and torch_dtype as dtype).
_EXPERTS = {"glm4_moe": ("n_routed_experts", "num_local_experts", "num_experts"),
            "qwen3_moe": ("num_experts", "num_local_experts")}
_ALIASES = (("num_experts", "num_local_experts", "n_routed_experts"), ("torch_dtype", "dtype"))
# Inside transformers 5's `rope_parameters` dict rather than top level.
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
# to_hf_config keys that are defaults rather than facts about the weights: an original
# config.json's values win for these on export.
_DEFAULT_KEYS = frozenset({"architectures", "max_position_embeddings", "rope_scaling", "use_cache",
                           "attention_dropout", "initializer_range", "num_nextn_predict_layers",
                           "router_aux_loss_coef", "output_router_logits", "sliding_window"})


def from_hf_config(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A validated ModelConfig from an HF GLM-4.5 / Qwen3-MoE config.json dict (+ field overrides).

  Reads transformers 4 and 5 spellings (num_local_experts, rope_parameters, dtype); an override
  replaces its field before the config.json is read for it, so it can supply a missing field.
  """
  arch = hf.get("model_type")
  _check(arch in ARCHS, "model_type", f"{arch!r}; expected one of {tuple(ARCHS)}")
  _check(hf.get("hidden_act", "silu") == "silu", "hidden_act", "only 'silu' (SwiGLU)")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
  _check(kind == "default", "rope_scaling" if scaling else "rope_parameters",
         f"rope type {kind!r}; only the default RoPE is modelled")

  def get(field: str, *names: str, default: Any = None, cast: Callable[[Any], Any] = int) -> Any:
    return overrides[field] if field in overrides else cast(_get(hf, *names, default=default))

  dtype = str(hf.get("torch_dtype", hf.get("dtype", "bfloat16")))
  dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
  heads = get("num_heads", "num_attention_heads")
  hidden = get("hidden_size", "hidden_size")
  fields: dict[str, Any] = dict(
      vocab_size=get("vocab_size", "vocab_size"), hidden_size=hidden,
      num_layers=get("num_layers", "num_hidden_layers"), num_heads=heads,
      num_kv_heads=get("num_kv_heads", "num_key_value_heads", default=heads),
      head_dim=get("head_dim", "head_dim", default=hidden // heads),
      intermediate_size=get("intermediate_size", "intermediate_size"),
      moe_intermediate_size=get("moe_intermediate_size", "moe_intermediate_size"),
      num_experts_per_tok=get("num_experts_per_tok", "num_experts_per_tok"),
      num_experts=get("num_experts", *_EXPERTS[arch]),
      rope_theta=get("rope_theta", "rope_theta", default=rope.get("rope_theta", 10000.0),
                     cast=float),
      partial_rotary_factor=get("partial_rotary_factor", "partial_rotary_factor",
                                default=rope.get("partial_rotary_factor", 1.0), cast=float),
      rms_norm_eps=get("rms_norm_eps", "rms_norm_eps", default=1e-6, cast=float),
      qkv_bias=bool(hf.get("attention_bias", False)),
      norm_topk_prob=bool(hf.get("norm_topk_prob", arch == "glm4_moe")),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=dtype, param_dtype=dtype)
  if arch == "glm4_moe":
    _check(int(hf.get("n_group", 1) or 1) == 1 and int(hf.get("topk_group", 1) or 1) == 1,
           "n_group", "group-limited routing (n_group/topk_group > 1) is not modelled")
    fields.update(num_shared_experts=get("num_shared_experts", "n_shared_experts", default=1),
                  first_k_dense=get("first_k_dense", "first_k_dense_replace", default=1),
                  routed_scaling_factor=get("routed_scaling_factor", "routed_scaling_factor",
                                            default=1.0, cast=float),
                  qk_norm=bool(hf.get("use_qk_norm", False)), router_score="sigmoid",
                  router_bias=True)
  else:
    layers = fields["num_layers"]
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    _check(dense == list(range(len(dense))), "mlp_only_layers",
           f"dense layers {dense} must be a prefix 0..k-1 (our first_k_dense)")
    _check(not hf.get("use_sliding_window", False), "use_sliding_window", "sliding window")
    fields.update(num_shared_experts=0, first_k_dense=len(dense), qk_norm=True,
                  router_score="softmax", router_bias=False, routed_scaling_factor=1.0,
                  partial_rotary_factor=1.0)
  fields.update(overrides)
  return ModelConfig(**fields).validate()


def merge_hf_config(original: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
  """`ours` (to_hf_config) written over an original config.json, keeping the original's other
  keys, its defaults (max_position_embeddings, ...) and its spellings, so an import -> export
  round trip loses nothing of the original."""
  if original.get("model_type") != ours["model_type"]:
    raise ConfigError("model_type", f"the original config.json is {original.get('model_type')!r} "
                      f"but the export is {ours['model_type']!r}; export as that arch or drop "
                      "the original config")
  rope = original.get("rope_parameters")
  out = dict(original)
  for key, value in ours.items():
    if key in _DEFAULT_KEYS and (key in original or (key == "rope_scaling" and rope)):
      continue
    if isinstance(rope, Mapping) and key in _ROPE_KEYS and key not in original:
      out["rope_parameters"] = {**out["rope_parameters"], key: value}
      continue
    names = next((a for a in _ALIASES if key in a), (key,))
    for name in [n for n in names if n in original] or [key]:
      out[name] = value
  return out

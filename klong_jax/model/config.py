"""Model hyper-parameters: one frozen dataclass, validated, with named presets.

`ModelConfig` is what every layer reads; `get_preset(name)` gives the tiny/small CPU models and
the GLM-4.5-Air / Qwen3-MoE shapes; `from_config_dict` builds one from a `config.model` section.
This module imports no JAX so configs and fleet hosts can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ROUTER_SCORES = ("sigmoid", "softmax")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "splash", "cudnn")
MOE_IMPLS = ("auto", "ragged", "gmm", "blocked", "dense", "capacity")
MOE_DISPATCHES = ("auto", "allgather", "a2a")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A malformed model config; the message names the offending field and the fix."""

  def __init__(self, field: str, reason: str):
    super().__init__(f"model config field {field!r}: {reason}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of a GLM-4.5 / Qwen3-style MoE decoder (names follow HF configs)."""

  vocab_size: int = 512
  hidden_size: int = 64
  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  intermediate_size: int = 128  # Dense FFN width (first_k_dense layers).
  moe_intermediate_size: int = 32  # Width of each routed / shared expert.
  num_experts: int = 8
  num_experts_per_tok: int = 2  # top_k.
  num_shared_experts: int = 1
  first_k_dense: int = 1  # Leading layers with a dense FFN instead of MoE.
  partial_rotary_factor: float = 0.5  # Fraction of head_dim that gets rotary embedding.
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = True
  qk_norm: bool = False
  router_score: str = "sigmoid"  # "sigmoid" (GLM) or "softmax" (Qwen3).
  router_bias: bool = True  # Expert-bias correction term, used for top-k selection only.
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  tie_embeddings: bool = False
  moe_impl: str = "auto"  # "auto": megablox gmm on TPU, ragged_dot on GPU, blocked matmul on CPU.
  moe_dispatch: str = "auto"  # "allgather" | "a2a" (model/moe_a2a.py) | "auto": a2a if it applies.
  moe_block_size: int = 128  # Row block of the block-padded grouped matmul (benchmarks/moe.py).
  # moe_impl="capacity" (token dropping): each expert takes ceil(factor * tokens * top_k / E)
  # copies per dispatch group; the rest are dropped (aux "moe_drop_rate").
  capacity_factor: float = 1.25
  # Routed experts over each row in chunks of this many tokens (scan + remat: one chunk's
  # dispatch / expert working set at a time, model/moe_chunk.py); 0 = the whole row at once.
  moe_token_chunk: int = 0
  # "auto": splash on TPU, cuDNN on GPU (bf16 rows without segment ids), else blockwise (on CPU
  # the reference up to 128 tokens) (klong_jax/kernels/attention/dispatch.py).
  attention_impl: str = "auto"
  attention_block_q: int = 0  # Query / kv tile of blockwise and splash; 0 = the backend's default.
  attention_block_kv: int = 0
  lb_loss_coef: float = 1e-3  # Suggested weights for the trainer; the model returns raw terms.
  z_loss_coef: float = 1e-4
  scan_layers: bool = True  # Run the MoE layers stacked under nnx.scan.
  remat_policy: str = "none"
  dtype: str = "float32"  # Activation / compute dtype.
  param_dtype: str = "float32"
  init_std: float = 0.02

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense

  @property
  def rotary_dim(self) -> int:
    """Rotated dims per head (even), from partial_rotary_factor."""
    return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

  def validate(self) -> ModelConfig:
    """Raises ConfigError naming the first bad field; returns self for chaining."""
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                "moe_block_size")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError("num_kv_heads", f"num_heads={self.num_heads} must be divisible by "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.num_experts_per_tok > self.num_experts:
      raise ConfigError("num_experts_per_tok", f"top_k={self.num_experts_per_tok} exceeds "
                        f"num_experts={self.num_experts}")
    if not 0 <= self.first_k_dense <= self.num_layers:
      raise ConfigError("first_k_dense", f"must be in [0, num_layers={self.num_layers}], "
                        f"got {self.first_k_dense}")
    if self.num_shared_experts < 0:
      raise ConfigError("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
    if not 0.0 <= self.partial_rotary_factor <= 1.0:
      raise ConfigError("partial_rotary_factor", f"must be in [0, 1], got "
                        f"{self.partial_rotary_factor}")
    if self.router_score not in ROUTER_SCORES:
      raise ConfigError("router_score", f"{self.router_score!r} not in {ROUTER_SCORES}")
    if self.moe_impl not in MOE_IMPLS:
      raise ConfigError("moe_impl", f"{self.moe_impl!r} not in {MOE_IMPLS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError("attention_impl", f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
    for name in ("attention_block_q", "attention_block_kv"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(name, f"must be an int >= 0 (0 = backend default), got {value!r}")
    if self.moe_dispatch not in MOE_DISPATCHES:
      raise ConfigError("moe_dispatch", f"{self.moe_dispatch!r} not in {MOE_DISPATCHES}")
    if self.moe_dispatch == "a2a" and self.moe_impl == "capacity":
      raise ConfigError("moe_dispatch", "'a2a' has no token-dropping path: with "
                        "moe_impl='capacity' use moe_dispatch='allgather' or 'auto'")
    if (not isinstance(self.moe_token_chunk, int) or isinstance(self.moe_token_chunk, bool) or
        self.moe_token_chunk < 0):
      raise ConfigError("moe_token_chunk", f"must be an int >= 0 (0 = no chunking), got "
                        f"{self.moe_token_chunk!r}")
    if self.moe_token_chunk and self.moe_impl == "capacity":
      raise ConfigError("moe_token_chunk", "token chunking is for the dropless MoE: capacity is "
                        "per dispatch group and would change with the chunk; set "
                        "moe_token_chunk=0 or a dropless moe_impl")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError("remat_policy", f"{self.remat_policy!r} not in {REMAT_POLICIES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(name, f"{getattr(self, name)!r} not in {DTYPES}")
    if not (isinstance(self.capacity_factor, int | float) and
            0 < self.capacity_factor < float("inf")):
      raise ConfigError("capacity_factor", f"must be a finite number > 0 (1.0-2.0 is typical), "
                        f"got {self.capacity_factor!r}")
    for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "init_std"):
      if not getattr(self, name) > 0:
        raise ConfigError(name, f"must be > 0, got {getattr(self, name)!r}")
    return self

  def replace(self, **changes: Any) -> ModelConfig:
    """A validated copy with `changes` applied."""
    return dataclasses.replace(self, **changes).validate()


_PRESETS: dict[str, ModelConfig] = {
    # CPU, seconds: 3 layers (first dense), 8 experts top-2, vocab 512.
    "tiny": ModelConfig(),
    # A bit bigger, still CPU-friendly: 4 layers, 16 experts top-4.
    "small": ModelConfig(
        vocab_size=2048, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
        intermediate_size=384, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4),
    # GLM-4.5-Air (HF Glm4MoeForCausalLM config; the MTP layer is not modelled).
    "glm45_air": ModelConfig(
        vocab_size=151552, hidden_size=4096, num_layers=46, num_heads=96, num_kv_heads=8,
        head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, num_experts=128,
        num_experts_per_tok=8, num_shared_experts=1, first_k_dense=1, partial_rotary_factor=0.5,
        rope_theta=1e6, rms_norm_eps=1e-5, qkv_bias=True, qk_norm=False, router_score="sigmoid",
        router_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False,
        dtype="bfloat16"),
    # Qwen3-30B-A3B (HF Qwen3MoeForCausalLM config).
    "qwen3_moe": ModelConfig(
        vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_shared_experts=0, first_k_dense=0, partial_rotary_factor=1.0,
        rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=False, qk_norm=True, router_score="softmax",
        router_bias=False, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False,
        dtype="bfloat16"),
}


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get_preset(name: str) -> ModelConfig:
  """The named preset ("tiny", "small", "glm45_air", "qwen3_moe"), validated."""
  if name not in _PRESETS:
    raise ConfigError("preset", f"unknown preset {name!r}; choose one of {preset_names()}")
  return _PRESETS[name].validate()


def from_config_dict(section: Mapping[str, Any] | Any) -> ModelConfig:
  """Builds a validated ModelConfig from a `config.model` ConfigDict (or a plain mapping).

  An optional `preset` key gives the base; the other keys override its fields. Unknown keys raise.
  """
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  values = dict(section)
  base = get_preset(values.pop("preset")) if "preset" in values else ModelConfig()
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  for key in values:
    if key not in names:
      raise ConfigError(key, f"unknown field; valid fields are {sorted(names)}")
  return dataclasses.replace(base, **values).validate()

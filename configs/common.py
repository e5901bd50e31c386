"""Shared config helpers: arg parsing and the `model` / `mesh` sections built from presets.

Imports only ml_collections (configs must load on JAX-free fleet hosts). The model presets mirror
`klong_jax.model.config` (kept in sync by tests/model/test_config.py).
"""

from __future__ import annotations

from typing import Any

import ml_collections

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, first_k_dense=1, partial_rotary_factor=0.5, rope_theta=10000.0,
        rms_norm_eps=1e-5, qkv_bias=True, qk_norm=False, router_score="sigmoid",
        router_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False),
    "small": dict(
        vocab_size=2048, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
        intermediate_size=384, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
        num_shared_experts=1, first_k_dense=1, partial_rotary_factor=0.5, rope_theta=10000.0,
        rms_norm_eps=1e-5, qkv_bias=True, qk_norm=False, router_score="sigmoid",
        router_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False),
    "glm45_air": dict(
        vocab_size=151552, hidden_size=4096, num_layers=46, num_heads=96, num_kv_heads=8,
        head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, num_experts=128,
        num_experts_per_tok=8, num_shared_experts=1, first_k_dense=1, partial_rotary_factor=0.5,
        rope_theta=1e6, rms_norm_eps=1e-5, qkv_bias=True, qk_norm=False, router_score="sigmoid",
        router_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False,
        dtype="bfloat16"),
    "qwen3_moe": dict(
        vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_shared_experts=0, first_k_dense=0, partial_rotary_factor=1.0,
        rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=False, qk_norm=True, router_score="softmax",
        router_bias=False, norm_topk_prob=True, routed_scaling_factor=1.0, tie_embeddings=False,
        dtype="bfloat16"),
}

# Fields every preset shares (the ModelConfig defaults for the run-time switches).
MODEL_DEFAULTS: dict[str, Any] = dict(
    moe_impl="auto", moe_block_size=128, capacity_factor=1.25, lb_loss_coef=1e-3,
    z_loss_coef=1e-4, scan_layers=True,
    remat_policy="none", dtype="float32", param_dtype="float32", init_std=0.02)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" (or a bare flag "k1") into typed fields; defaults give the types."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; valid: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = value.lower() in ("", "1", "true", "yes")
    else:
      parsed[key] = kind(value)
  return parsed


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `model` section for a preset (all ModelConfig fields), with overrides applied."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
  fields = {**MODEL_DEFAULTS, **MODEL_PRESETS[preset], **overrides}
  return ml_collections.ConfigDict(fields)


def mesh_config(data: int = 1, fsdp: int = -1, expert: int = 1,
                tensor: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` section: axis sizes; -1 fills the remaining devices."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor))


def base_config(preset: str, **mesh: int) -> ml_collections.ConfigDict:
  """A ConfigDict with `model` and `mesh` sections; experiment configs add the rest."""
  config = ml_collections.ConfigDict()
  config.model = model_config(preset)
  config.mesh = mesh_config(**mesh)
  config.seed = 0
  return config


def preset_config(preset: str, arg: str | None, **mesh: int) -> ml_collections.ConfigDict:
  """A model preset's ConfigDict with the run-time switches of its arg string applied:
  `scan=0|1`, `remat=none|full|save_dots|offload`, `dtype=bfloat16`, `moe_impl=auto|...`."""
  args = parse_arg(arg, scan=True, remat="none", dtype="", moe_impl="auto")
  config = base_config(preset, **mesh)
  config.model.scan_layers = args.scan
  config.model.remat_policy = args.remat
  config.model.moe_impl = args.moe_impl
  if args.dtype:
    config.model.dtype = args.dtype
  return config

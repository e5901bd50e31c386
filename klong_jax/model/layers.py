"""Basic layers: logical sharding helpers, RMSNorm, partial rotary embedding, SwiGLU MLP, embedder.

Weights carry logical axis names (`nnx.with_partitioning`) and dim letters in their attribute
names (gemma style: `gate_df` is [embed=d, mlp=f]); `parallel/rules.py` maps names to mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from klong_jax.model.config import ModelConfig
from klong_jax.parallel.rules import LOGICAL_RULES

Names = Sequence[str | None]


def current_rules() -> tuple[tuple[str, object], ...]:
  """Logical-axis rules in force: the `nnx.logical_axis_rules` context, else the default table."""
  rules = core_spmd.get_logical_axis_rules()
  if rules:
    return tuple(rules)
  return LOGICAL_RULES


def mesh_axes(name: str | None) -> tuple[str, ...]:
  """The mesh axes (in the current mesh) a logical name maps to; () when unmapped or meshless."""
  mesh = jax.sharding.get_abstract_mesh()
  if name is None or mesh.empty:
    return ()
  value = dict(current_rules()).get(name)
  if value is None:
    return ()
  axes = (value,) if isinstance(value, str) else tuple(value)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def logical_spec(names: Names) -> jax.sharding.PartitionSpec:
  """PartitionSpec for logical `names` under the current rules and mesh."""
  parts = []
  for name in names:
    axes = mesh_axes(name)
    parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*parts)


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Sharding constraint by logical names; a no-op without a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names))


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Names, cfg: ModelConfig,
          init: str = "normal", std: float | None = None) -> nnx.Param:
  """A Param with logical sharding names; `init` is "normal" (std), "zeros" or "ones".

  Eager sharding is off so a model's pytree (metadata included) is the same with or without a
  mesh; `model.sharded.create_sharded_model` places params by their `out_sharding` names.
  """
  if init == "normal":
    base = jax.nn.initializers.normal(stddev=cfg.init_std if std is None else std)
  elif init == "zeros":
    base = jax.nn.initializers.zeros
  else:
    base = jax.nn.initializers.ones
  value = base(rngs.params(), tuple(shape), dtype_of(cfg.param_dtype))
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in fp32, scale `scale_d` (HF `weight`)."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, name: str = "norm"):
    self.eps = cfg.rms_norm_eps
    self.scale_d = param(rngs, (dim,), (name,), cfg, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale_d[...].astype(jnp.float32)
    return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
  """Rotary embedding (HF rotate_half form) on the first `rotary_dim` dims of x [B,T,N,H]."""
  if rotary_dim == 0:
    return x
  half = rotary_dim // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim))
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  xr = x[..., :rotary_dim].astype(jnp.float32)
  x1, x2 = xr[..., :half], xr[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)); HF gate_proj/up_proj/down_proj."""

  def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dtype = dtype_of(cfg.dtype)
    self.gate_df = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.up_df = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.down_fd = param(rngs, (width, d), ("mlp", "embed"), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    gate = jnp.einsum("...d,df->...f", x, self.gate_df[...].astype(dt))
    up = jnp.einsum("...d,df->...f", x, self.up_df[...].astype(dt))
    h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp")[-x.ndim:])
    return jnp.einsum("...f,fd->...d", h, self.down_fd[...].astype(dt))


class Embedder(nnx.Module):
  """Token embedding `embed_vd` and (untied) output head `lm_head_dv`; logits in fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = dtype_of(cfg.dtype)
    self.tie = cfg.tie_embeddings
    self.embed_vd = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    if not self.tie:
      self.lm_head_dv = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embed_vd[...], tokens, axis=0).astype(self.dtype)
    return constrain(x, ("act_batch", "act_seq", "act_embed"))

  def head(self) -> tuple[jax.Array, str]:
    """(output head in the compute dtype, its layout): `lm_head_dv` [D, V] as "dv", or the tied
    `embed_vd` [V, D] as "vd"; for losses that tile the vocab (`kernels/vocab`)."""
    if self.tie:
      return self.embed_vd[...].astype(self.dtype), "vd"
    return self.lm_head_dv[...].astype(self.dtype), "dv"

  def decode(self, x: jax.Array) -> jax.Array:
    if self.tie:
      logits = jnp.einsum("btd,vd->btv", x, self.embed_vd[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head_dv[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

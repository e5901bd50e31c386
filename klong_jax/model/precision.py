"""The one compute-dtype policy shared by trainer and sampler: what runs in bf16, what stays fp32.

Matmul weights (attention/MLP/expert kernels, embedding, lm head) are cast to the compute dtype;
router weights, the MoE expert bias, norm scales and biases stay fp32. The model reads the kept
leaves in fp32 (router logits, RMSNorm) or casts them itself at use, so a forward on
`cast_params(p, bf16)` equals a forward on the fp32 masters with `model.dtype=bf16`: the trainer
(train/optim.cast_for_compute: SFT, RL policy and reference) and the server (the sampler's
weights, bf16 policy bundles) compute the same expert choice and logprobs. Gradients through the
cast are fp32 (the VJP of astype casts back), so masters and optimizer stay fp32.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Leaf names (any path component) that stay fp32: routers, the expert bias, norm scales, biases.
KEEP_FP32 = re.compile(r"router|bias|scale|norm")


def resolve_dtype(name: str | Any) -> Any:
  """Maps a config dtype name ('float32', 'bfloat16') to a jnp dtype; raises on unknown names."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r} in config; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keeps_fp32(path: tuple[Any, ...]) -> bool:
  """Whether the leaf at `path` (a jax key path or tuple of names) stays fp32 under the policy."""
  return any(KEEP_FP32.search(_key_name(k)) for k in path)


def leaf_dtype(path: tuple[Any, ...], dtype: Any, compute_dtype: Any) -> Any:
  """The dtype the policy gives a leaf of `dtype` at `path` (non-floats unchanged)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return jnp.float32 if keeps_fp32(path) else resolve_dtype(compute_dtype)


def cast_params(params: Any, compute_dtype: Any) -> Any:
  """`params` (nnx.State or any pytree with named paths) with the policy's dtypes.

  compute_dtype float32 casts nothing down (the kept leaves are fp32 either way).
  """
  compute_dtype = resolve_dtype(compute_dtype)

  def cast(path, x):
    want = leaf_dtype(path, x.dtype, compute_dtype)
    return x if x.dtype == want else x.astype(want)

  return jax.tree_util.tree_map_with_path(cast, params)


def policy_dtypes(params: Any, compute_dtype: Any) -> Any:
  """The policy's dtype per leaf (same tree), e.g. to build ShapeDtypeStructs for a restore."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_dtype(path, x.dtype, compute_dtype), params)

"""The attention switch: picks reference / blockwise / splash / cudnn by config and platform.

"auto": splash on TPU; cuDNN on GPU for bf16/fp16 rows without segment ids (its public API would
need a T x T mask for packed rows), blockwise otherwise; on CPU the reference up to one blockwise
tile (T <= 128: there blockwise is the same math plus a loop, measured ~1.3x slower forward) and
blockwise above (5-15x faster at T=512 with linear memory; benchmarks/attention.py). Cache
attention (prefill and decode) never uses splash or cuDNN: their masks are static causal over
equal-length q and kv, not positions over a cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from klong_jax.kernels.attention import blockwise, reference

Axes = str | tuple[str, ...] | None
IMPLS = ("auto", "reference", "blockwise", "splash", "cudnn")  # == model.config.ATTENTION_IMPLS.

DEFAULT_BLOCKS = {"blockwise": 128, "splash": 512}  # Used when a block size is 0.


def current_platform() -> str:
  """The platform being compiled for: the mesh's devices when a mesh is set (so an AOT compile for
  a TPU topology on a CPU host picks TPU kernels), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, dtype: jax.typing.DTypeLike, packed: bool, length: int,
            platform: str | None = None) -> str:
  """The concrete backend for `impl` on `platform` (default: `current_platform()`)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} not in {IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or current_platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda", "rocm") and not packed and jax.numpy.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "reference" if length <= DEFAULT_BLOCKS["blockwise"] else "blockwise"


def _blocks(backend: str, block_q: int, block_kv: int) -> dict[str, int]:
  default = DEFAULT_BLOCKS.get(backend, 128)
  return {"block_q": block_q or default, "block_kv": block_kv or default}


def _axes_size(mesh, axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def shard_rows(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
               segment_ids: jax.Array | None, batch_axes: Axes = None,
               head_axes: Axes = None) -> jax.Array:
  """Runs a per-row, per-head kernel under `shard_map`, rows split over `batch_axes` and (when both
  q and kv head counts divide) heads over `head_axes`: GSPMD cannot split a Pallas call. The
  sequence stays whole per shard. Without a mesh it is `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, segment_ids)
  batch, heads = batch_axes, head_axes
  if batch is not None and q.shape[0] % _axes_size(mesh, batch):
    batch = None
  if heads is not None and (k.shape[2] % _axes_size(mesh, heads) or
                            q.shape[2] % _axes_size(mesh, heads)):
    heads = None
  qs, ks = P(batch, None, heads, None), P(batch, None, heads, None)
  if segment_ids is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qs, ks, ks),
                         out_specs=qs, check_vma=False)(q, k, v)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, P(batch, None)), out_specs=qs,
                       check_vma=False)(q, k, v, segment_ids)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
           impl: str = "auto", block_q: int = 0, block_kv: int = 0, batch_axes: Axes = None,
           head_axes: Axes = None) -> jax.Array:
  """Causal self-attention (by token index, within equal segment ids; id 0 is just another id).

  q [B,T,N,H], k/v [B,T,K,H] with N % K == 0 -> [B,T,N,H]. Block sizes of 0 take the backend's
  default. `batch_axes` / `head_axes`: the mesh axes rows and (q and kv) heads are sharded over,
  for the kernels that run under shard_map (splash); the others leave sharding to GSPMD.
  """
  backend = resolve(impl, q.dtype, segment_ids is not None, q.shape[1])
  if backend == "reference":
    return reference.attention(q, k, v, segment_ids)
  if backend == "blockwise":
    return blockwise.attention(q, k, v, segment_ids, **_blocks(backend, block_q, block_kv))
  if backend == "splash":
    from klong_jax.kernels.attention import splash  # Pallas TPU import only when used.
    blocks = _blocks(backend, block_q, block_kv)
    interpret = current_platform() != "tpu"  # Pallas interpret mode off TPU (tests).
    return shard_rows(lambda q, k, v, s: splash.attention(q, k, v, s, interpret=interpret,
                                                          **blocks), q, k, v,
                      segment_ids, batch_axes, head_axes)
  from klong_jax.kernels.attention import cudnn
  return cudnn.attention(q, k, v, segment_ids)


def attend_cache(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, *,
                 impl: str = "auto", block_q: int = 0, block_kv: int = 0) -> jax.Array:
  """Queries at `positions` [B,T] over a KV cache [B,S,K,H] (slot s visible iff s <= position).

  Single-token decode (T == 1) and impl="reference" use the reference: its scores are [B,N,1,S],
  linear in the cache, and one fused softmax beats a loop over cache blocks. Prefill (T > 1) uses
  the blockwise kernel, so no [T, S] score exists and cache blocks past the last position are
  skipped.
  """
  if impl == "reference" or q.shape[1] == 1:
    return reference.cache_attention(q, k_cache, v_cache, positions)
  resolve(impl, q.dtype, False, q.shape[1])  # Validates the name.
  return blockwise.cache_attention(q, k_cache, v_cache, positions,
                                   **_blocks("blockwise", block_q, block_kv))

"""The attention switch: picks reference / blockwise / splash / cudnn by config and platform.

"auto": splash on TPU; cuDNN on GPU for bf16/fp16 rows without segment ids (its public API would
need a T x T mask for packed rows), blockwise otherwise; blockwise on CPU, where it matched the
reference forward at T=128 and beat it from T=512 up and on every gradient
(benchmarks/attention.py). Cache attention (prefill and decode) never uses splash or cuDNN: their
masks are static causal over equal-length q and kv, not positions over a cache.
"""

from __future__ import annotations

import jax

from klong_jax.kernels.attention import blockwise, reference
from klong_jax.model.config import ATTENTION_IMPLS as IMPLS  # One list; config imports no JAX.
DEFAULT_BLOCKS = {"blockwise": 128, "splash": 512}  # Used when a block size is 0.


def resolve(impl: str, dtype: jax.typing.DTypeLike, packed: bool,
            platform: str | None = None) -> str:
  """The concrete backend for `impl` on `platform` (default: JAX's default backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} not in {IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda", "rocm") and not packed and jax.numpy.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "blockwise"


def _blocks(backend: str, block_q: int, block_kv: int) -> dict[str, int]:
  default = DEFAULT_BLOCKS.get(backend, 128)
  return {"block_q": block_q or default, "block_kv": block_kv or default}


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
           impl: str = "auto", block_q: int = 0, block_kv: int = 0) -> jax.Array:
  """Causal self-attention (by token index, within equal segment ids; id 0 is just another id).

  q [B,T,N,H], k/v [B,T,K,H] with N % K == 0 -> [B,T,N,H]. Block sizes of 0 take the backend's
  default.
  """
  backend = resolve(impl, q.dtype, segment_ids is not None)
  if backend == "reference":
    return reference.attention(q, k, v, segment_ids)
  if backend == "blockwise":
    return blockwise.attention(q, k, v, segment_ids, **_blocks(backend, block_q, block_kv))
  if backend == "splash":
    from klong_jax.kernels.attention import splash  # Pallas TPU import only when used.
    return splash.attention(q, k, v, segment_ids, **_blocks(backend, block_q, block_kv))
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
  resolve(impl, q.dtype, False)  # Validates the name.
  return blockwise.cache_attention(q, k_cache, v_cache, positions,
                                   **_blocks("blockwise", block_q, block_kv))

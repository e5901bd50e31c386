"""Expert compute on one device's experts: dropless (sort copies by expert) or fixed-capacity.

Four interchangeable dropless implementations of the same function (tested equal):
- `dense`: every local expert on every token, combined by one-hot weights (reference; E/k x FLOPs).
- `ragged`: `jax.lax.ragged_dot` over token copies sorted by expert (the GPU path).
- `gmm`: the same sorted copies through the megablox Pallas kernel (the TPU path, chosen from the
  TPU compiler's flops and memory, `resolve_impl`; interpret mode elsewhere, for tests only).
- `blocked`: the sorted copies are padded so each expert's group fills whole row blocks, each
  block gathers its expert's weights and one batched matmul runs over blocks. ~k/E of the dense
  FLOPs plus < block rows of padding per expert; fast on CPU, where ragged_dot is lowered densely.
`offset` selects the local slice of experts [offset, offset + E_local): copies routed elsewhere
contribute zero (expert parallelism sums the partial outputs across devices).
`capacity_ffn` is the classic token-dropping path (GShard/Switch): each expert takes at most C
copies, one [E, C, D] batched matmul runs, the over-capacity copies are dropped (contribute
zero). Static shapes with no sort and no ragged_dot, for hardware where ragged_dot is slow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


def dense_reference(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                    wd: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """x [N,D], idx/w [N,k], wg/wu [E,D,F], wd [E,F,D] -> [N,D]; one-hot combine of all experts."""
  num_local = wg.shape[0]
  combine = jnp.sum(jax.nn.one_hot(idx - offset, num_local, dtype=jnp.float32) * w[..., None],
                    axis=1)  # Out-of-range ids one-hot to zeros.
  h = _swiglu(jnp.einsum("nd,edf->enf", x, wg), jnp.einsum("nd,edf->enf", x, wu))
  y = jnp.einsum("enf,efd->end", h, wd)
  return jnp.einsum("end,ne->nd", y, combine.astype(y.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def sort_by_expert(idx: jax.Array, num_local: int, offset: jax.Array | int = 0
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Stable sort of the N*k copies by local expert; foreign copies go last (group `num_local`).

  Returns (order [M], sorted local expert [M], group_sizes [num_local] int32, valid [M] bool in
  original copy order).
  """
  local = idx.reshape(-1) - offset
  valid = (local >= 0) & (local < num_local)
  key = jnp.where(valid, local, num_local).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)
  group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
  return order, key[order], group_sizes, valid


def combine(rows: jax.Array, order: jax.Array, valid: jax.Array, w: jax.Array,
             out_dtype: jnp.dtype) -> jax.Array:
  """Un-sorts per-copy outputs [M,D] and sums them per token with weights w [N,k]."""
  n, k = w.shape
  inverse = jnp.argsort(order)
  per_copy = jnp.where(valid[:, None], rows[inverse], 0).reshape(n, k, -1)
  weights = jnp.where(valid.reshape(n, k), w, 0.0)
  return jnp.einsum("nkd,nk->nd", per_copy, weights.astype(per_copy.dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def ragged_ffn(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
               wd: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """Dropless experts with `jax.lax.ragged_dot` over expert-sorted token copies."""
  k = idx.shape[1]
  order, _, sizes, valid = sort_by_expert(idx, wg.shape[0], offset)
  xs = jnp.take(x, order // k, axis=0)
  h = _swiglu(jax.lax.ragged_dot(xs, wg, sizes), jax.lax.ragged_dot(xs, wu, sizes))
  return combine(jax.lax.ragged_dot(h, wd, sizes), order, valid, w, x.dtype)


def _gmm_tiling(rows: int, d: int, f: int) -> tuple[int, int, int]:
  """megablox tiles (m, k, n): 128 where the dim allows it, else the whole (small) dim."""
  return (min(128, rows), 128 if d % 128 == 0 else d, 128 if f % 128 == 0 else f)


def gmm_ffn(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
            wd: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """Dropless experts with megablox `gmm` (Pallas TPU kernel; interpret mode off TPU).

  Rows are padded to a whole m-tile; rows past the last group (foreign copies, padding) are zeroed
  on the way in, so the kernel's unwritten rows never reach x's gradient.
  """
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # TPU-only kernel.
  k = idx.shape[1]
  num_local, d, f = wg.shape
  interpret = target_platform() != "tpu"
  if not interpret and (d % 128 or f % 128):
    # Mosaic needs 128-multiples on both matmul dims in every pass (the backward tiles the model
    # dim by the expert-hidden tile), e.g. glm45_air's F=1408 split over tensor=2 is 704: there
    # ragged_dot is the grouped matmul.
    return ragged_ffn(x, idx, w, wg, wu, wd, offset)
  order, _, sizes, valid = sort_by_expert(idx, num_local, offset)
  rows = idx.size
  tiling = _gmm_tiling(rows, d, f)
  padded = -(-rows // tiling[0]) * tiling[0]
  in_groups = (jnp.arange(padded) < jnp.sum(sizes))[:, None]
  xs = jnp.take(x, order // k, axis=0)
  xs = jnp.where(in_groups, jnp.pad(xs, ((0, padded - rows), (0, 0))), 0)

  def mm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    tile = _gmm_tiling(padded, lhs.shape[1], rhs.shape[2])
    out = megablox.gmm(lhs, rhs, sizes, lhs.dtype, tile, None, None, False, interpret)
    return jnp.where(in_groups, out, 0)

  h = _swiglu(mm(xs, wg), mm(xs, wu))
  return combine(mm(h, wd)[:rows], order, valid, w, x.dtype)


def effective_block(rows: int, num_local: int, block_size: int) -> int:
  """Block rows actually used: `block_size`, shrunk (power of two) when groups are tiny."""
  per_group = max(1, rows // max(1, num_local))
  return max(1, min(block_size, 1 << (per_group.bit_length() - 1)))


def blocked_ffn(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                wd: jax.Array, offset: jax.Array | int = 0, block_size: int = 64) -> jax.Array:
  """Dropless experts as a block-padded grouped matmul (static shapes, no ragged_dot)."""
  n, k = idx.shape
  num_local = wg.shape[0]
  rows = n * k
  block = effective_block(rows, num_local, block_size)
  order, sorted_group, sizes, valid = sort_by_expert(idx, num_local, offset)
  # Worst case: every non-empty group wastes block-1 rows of padding.
  capacity = -(-(rows + min(num_local, rows) * (block - 1)) // block) * block
  num_blocks = capacity // block
  padded = -(-sizes // block) * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  group_start = jnp.cumsum(sizes) - sizes
  safe_group = jnp.minimum(sorted_group, num_local - 1)
  rank = jnp.arange(rows) - group_start[safe_group]
  dest = jnp.where(sorted_group < num_local, padded_start[safe_group] + rank, capacity)
  xs = jnp.take(x, order // k, axis=0)
  xp = jnp.zeros((capacity, x.shape[1]), x.dtype).at[dest].set(xs, mode="drop")
  block_group = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
  block_group = jnp.minimum(block_group, num_local - 1)
  xb = xp.reshape(num_blocks, block, -1)
  h = _swiglu(jnp.einsum("bmd,bdf->bmf", xb, jnp.take(wg, block_group, axis=0)),
              jnp.einsum("bmd,bdf->bmf", xb, jnp.take(wu, block_group, axis=0)))
  yb = jnp.einsum("bmf,bfd->bmd", h, jnp.take(wd, block_group, axis=0))
  ys = jnp.take(yb.reshape(capacity, -1), dest, axis=0, mode="fill", fill_value=0)
  return combine(ys, order, valid, w, x.dtype)


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Per-expert slots C = ceil(capacity_factor * tokens * top_k / num_experts), at least 1."""
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def capacity_positions(idx: jax.Array, num_local: int, capacity: int, offset: jax.Array | int = 0
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Position of each copy in its expert's buffer, choice-major (all 1st choices before 2nd).

  Returns (local expert [N,k] int32, position [N,k] int32, kept [N,k] bool); `kept` is False for
  copies routed to other devices' experts and for copies at position >= capacity (dropped).
  """
  n, k = idx.shape
  local = idx - offset
  valid = (local >= 0) & (local < num_local)
  onehot = jax.nn.one_hot(jnp.where(valid, local, num_local), num_local, dtype=jnp.int32)
  # Choice-major order [k*N, E]: a token's top-1 copy outranks every top-2 copy (GShard priority).
  order = onehot.transpose(1, 0, 2).reshape(k * n, num_local)
  position = jnp.sum((jnp.cumsum(order, axis=0) - 1) * order, axis=-1)
  position = position.reshape(k, n).T.astype(jnp.int32)
  return local.astype(jnp.int32), position, valid & (position < capacity)


def capacity_ffn(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                 wd: jax.Array, offset: jax.Array | int = 0, *, capacity: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Token-dropping experts with `capacity` slots each -> (y [N,D], dropped local copies).

  Copies are scattered into an [E_local, C, D] buffer (slot expert*C + position), run through one
  batched SwiGLU matmul and gathered back; dropped copies (position >= C) contribute zero.
  The count covers only copies routed to this device's experts, as an fp32 scalar.
  """
  n, k = idx.shape
  num_local = wg.shape[0]
  local, position, kept = capacity_positions(idx, num_local, capacity, offset)
  valid = (local >= 0) & (local < num_local)
  slots = num_local * capacity
  dest = jnp.where(kept, local * capacity + position, slots).reshape(-1)  # `slots` = nowhere.
  xs = jnp.repeat(x, k, axis=0)  # Copy m = token m // k, choice m % k.
  xe = jnp.zeros((slots, x.shape[1]), x.dtype).at[dest].set(xs, mode="drop")
  xe = xe.reshape(num_local, capacity, -1)
  h = _swiglu(jnp.einsum("ecd,edf->ecf", xe, wg), jnp.einsum("ecd,edf->ecf", xe, wu))
  ye = jnp.einsum("ecf,efd->ecd", h, wd).reshape(slots, -1)
  per_copy = jnp.take(ye, dest, axis=0, mode="fill", fill_value=0).reshape(n, k, -1)
  weights = jnp.where(kept, w, 0.0).astype(per_copy.dtype)
  y = jnp.einsum("nkd,nk->nd", per_copy, weights,
                 preferred_element_type=jnp.float32).astype(x.dtype)
  return y, jnp.sum(valid & ~kept).astype(jnp.float32)


def target_platform() -> str:
  """Platform being compiled for: the devices of the mesh set by `jax.set_mesh` (so an AOT compile
  for a TPU topology on a CPU host picks the TPU paths), else JAX's default backend."""
  try:
    from jax._src.mesh import get_concrete_mesh  # No public getter works inside jit.
    mesh = get_concrete_mesh()
    if mesh is not None and not mesh.empty:
      return mesh.devices.flat[0].platform
  except (ImportError, AttributeError):
    pass
  return jax.default_backend()


def resolve_impl(impl: str) -> str:
  """"auto" by platform: blocked on CPU (ragged_dot is lowered densely there), ragged_dot on GPU,
  megablox gmm on TPU: for glm45_air experts (fwd+bwd, one v5p chip) the TPU compiler costs
  ragged_dot at 6x the matmul flops (its weight gradient runs densely over the 16 groups) and
  2.27 GiB of temporaries, gmm at 1.0x and 1.68 GiB (benchmarks/moe_dispatch.py)."""
  if impl != "auto":
    return impl
  return {"cpu": "blocked", "tpu": "gmm"}.get(target_platform(), "ragged")


def local_experts(impl: str, x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array,
                  wu: jax.Array, wd: jax.Array, offset: jax.Array | int = 0,
                  block_size: int = 64) -> jax.Array:
  """Dispatches to one implementation ("dense" | "ragged" | "gmm" | "blocked" | "auto")."""
  impl = resolve_impl(impl)
  if impl == "gmm":
    return gmm_ffn(x, idx, w, wg, wu, wd, offset)
  if impl == "dense":
    return dense_reference(x, idx, w, wg, wu, wd, offset)
  if impl == "ragged":
    return ragged_ffn(x, idx, w, wg, wu, wd, offset)
  if impl == "blocked":
    return blocked_ffn(x, idx, w, wg, wu, wd, offset, block_size)
  raise ValueError(f"moe_impl {impl!r} is not one of auto/dense/ragged/gmm/blocked (the "
                   "token-dropping 'capacity' path is capacity_ffn, which also returns the drop "
                   "count)")

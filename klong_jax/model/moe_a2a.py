"""All-to-all expert parallelism: send each token copy to its expert's device and back.

Runs per device inside the `shard_map` of `moe.routed_experts` (the all-gather dispatch there is
the reference). Mesh axes that shard both tokens and experts (`gather`, e.g. `expert`) form the
exchange group of size G; expert axes that do not shard tokens (`rest`) see the same tokens on
every device, so each device keeps only the copies whose expert lives on its `rest` coordinate
and the partial outputs are psum'd over `rest` afterwards (in `moe.routed_experts`). Per device:

1. sort its n*k token copies by (destination device, local expert): counts [G, E_local];
2. exchange counts (small `all_to_all`) then rows, compute the received rows with the grouped
   matmul (`moe_dispatch.local_experts`, one copy per row, weight 1), return them by the reverse
   exchange, un-sort and combine with the gate weights.

Row exchange, chosen by `exchange` ("auto": ragged off CPU, padded on CPU):
- "ragged": `jax.lax.ragged_all_to_all` (TPU v4+/GPU; XLA:CPU lacks it) sends exactly the copies;
  the receive buffer holds the worst case, G*n*min(k, E_local) rows (every copy of the group for
  this device's experts; a token picks distinct experts, `moe_router.replay_experts` enforces it
  for recorded ids), so nothing can overflow: exactly dropless.
- "padded": `jax.lax.all_to_all` of fixed [G, C, D] buffers, C = n*min(k, E_local) per device
  pair, also the worst case: exactly dropless, but it moves and computes G*C rows per device
  whatever the routing, about the all-gather path's cost. There is no capacity-bounded variant:
  token dropping stays `moe_impl="capacity"` on the all-gather path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from klong_jax.model import moe_dispatch

EXCHANGES = ("auto", "ragged", "padded")


def resolve_exchange(exchange: str) -> str:
  """"auto": ragged_all_to_all off CPU (XLA:CPU has no ragged-all-to-all), padded on CPU."""
  if exchange == "auto":
    return "padded" if jax.default_backend() == "cpu" else "ragged"
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange {exchange!r} not in {EXCHANGES}")
  return exchange


def _index(axes: tuple[str, ...]) -> jax.Array | int:
  """Row-major index of this device over `axes` (the order collectives over `axes` use)."""
  index = 0
  for axis in axes:
    index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  return index


def _split_shard(shard: jax.Array, exp_axes: tuple[str, ...], gather: tuple[str, ...]
                 ) -> tuple[jax.Array, jax.Array]:
  """Expert-shard index (row-major over exp_axes) -> (its index over `gather`, over the rest)."""
  sizes = [jax.lax.axis_size(a) for a in exp_axes]
  coords, rem = [], shard
  for size in reversed(sizes):
    coords.append(rem % size)
    rem = rem // size
  coords = dict(zip(reversed(exp_axes), coords, strict=True))
  g = r = 0
  for axis, size in zip(exp_axes, sizes, strict=True):
    if axis in gather:
      g = g * size + coords[axis]
    else:
      r = r * size + coords[axis]
  return g, r


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                               send_sizes: jax.Array, output_offsets: jax.Array,
                               recv_sizes: jax.Array, *, axis_name: tuple[str, ...]
                               ) -> jax.Array:
  """`jax.lax.ragged_all_to_all` (one slice per peer) from all_gathers: for CPU tests of the
  offsets only (it gathers every operand, G times the traffic)."""
  del recv_sizes
  me = _index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name, tiled=False)  # [G, M, D]
  in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # Each source's slice for me.
  sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  rows = jnp.arange(output.shape[0])
  mine = (rows[None, :] >= out_off[:, None]) & (rows[None, :] < (out_off + sizes)[:, None])
  src = jnp.argmax(mine, axis=0)  # Source whose slice covers each output row (if any).
  covered = jnp.any(mine, axis=0)
  pos = in_off[src] + rows - out_off[src]
  got = operands[src, jnp.clip(pos, 0, operand.shape[0] - 1)]
  return jnp.where(covered[:, None], got, output)


def _row_experts(counts: jax.Array, rows: int) -> jax.Array:
  """Local expert of each row of a buffer holding segments (source, expert) back to back with
  sizes counts [G, L], in row-major order; rows past the segments get L (no expert)."""
  num_local = counts.shape[1]
  ends = jnp.cumsum(counts.reshape(-1))
  segment = jnp.searchsorted(ends, jnp.arange(rows), side="right")
  return jnp.where(segment < ends.shape[0], segment % num_local, num_local).astype(jnp.int32)


def a2a_experts(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                wd: jax.Array, *, exp_axes: tuple[str, ...], gather: tuple[str, ...],
                impl: str = "auto", block_size: int = 64, exchange: str = "auto",
                ragged_fn: object = None) -> jax.Array:
  """This device's routed output [n,D] for its tokens x [n,D] (idx/w [n,k], global expert ids),
  partial over the `rest` expert axes and the expert hidden dim's axes; inside shard_map.

  wg/wu [E_local,D,F'], wd [E_local,F',D]: this device's experts. `ragged_fn` replaces
  `jax.lax.ragged_all_to_all` (tests use `emulated_ragged_all_to_all` on CPU).
  """
  exchange = resolve_exchange(exchange)
  n, k = idx.shape
  num_local = wg.shape[0]
  size = math.prod(jax.lax.axis_size(a) for a in gather)
  rest = tuple(a for a in exp_axes if a not in gather)
  dest, dest_rest = _split_shard(idx // num_local, exp_axes, gather)
  valid = (dest_rest == _index(rest)).reshape(-1) if rest else jnp.ones((n * k,), bool)
  key = jnp.where(valid, (dest * num_local + idx % num_local).reshape(-1), size * num_local)
  order = jnp.argsort(key, stable=True)
  counts = jnp.bincount(key, length=size * num_local + 1)[:-1].reshape(size, num_local)
  counts = counts.astype(jnp.int32)
  send = jnp.sum(counts, axis=1)
  recv_counts = jax.lax.all_to_all(counts, gather, 0, 0, tiled=True)  # [source, local expert]
  recv = jnp.sum(recv_counts, axis=1)
  xs = jnp.take(x, order // k, axis=0)
  per_pair = n * min(k, num_local)  # Worst case copies one device sends to one device.
  d = x.shape[1]
  ones = jnp.ones((size * per_pair, 1), jnp.float32)
  if exchange == "ragged":
    a2a = jax.lax.ragged_all_to_all if ragged_fn is None else ragged_fn
    in_off = jnp.cumsum(send) - send
    table = jax.lax.all_gather(send, gather)  # [source, destination] copy counts.
    out_off = (jnp.cumsum(table, axis=0) - table)[_index(gather)]
    buf = a2a(xs, jnp.zeros((size * per_pair, d), x.dtype), in_off, send, out_off, recv,
              axis_name=gather)
    ids = _row_experts(recv_counts, size * per_pair)
    rows = moe_dispatch.local_experts(impl, buf, ids[:, None], ones, wg, wu, wd, 0, block_size)
    recv_off = jnp.cumsum(recv) - recv
    back_off = jax.lax.all_to_all(in_off, gather, 0, 0, tiled=True)  # My slice in each source.
    per_copy = a2a(rows, jnp.zeros((n * k, d), rows.dtype), recv_off, recv, back_off, send,
                   axis_name=gather)
  else:
    sorted_dest = jnp.minimum(key[order] // num_local, size - 1)
    start = jnp.cumsum(send) - send
    slot = jnp.where(key[order] < size * num_local,
                     sorted_dest * per_pair + jnp.arange(n * k) - start[sorted_dest],
                     size * per_pair)
    buf = jnp.zeros((size * per_pair, d), x.dtype).at[slot].set(xs, mode="drop")
    buf = jax.lax.all_to_all(buf.reshape(size, per_pair, d), gather, 0, 0, tiled=True)
    ids = jax.vmap(lambda c: _row_experts(c[None], per_pair))(recv_counts).reshape(-1)
    rows = moe_dispatch.local_experts(impl, buf.reshape(size * per_pair, d), ids[:, None], ones,
                                      wg, wu, wd, 0, block_size)
    rows = jax.lax.all_to_all(rows.reshape(size, per_pair, d), gather, 0, 0, tiled=True)
    per_copy = jnp.take(rows.reshape(size * per_pair, d), slot, axis=0, mode="fill",
                        fill_value=0)
  return moe_dispatch.combine(per_copy, order, valid, w, x.dtype)

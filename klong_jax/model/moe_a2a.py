"""All-to-all expert parallelism: send each token to the devices holding its experts, and back.

Runs per device inside the `shard_map` of `moe.routed_experts` (the all-gather dispatch there is
the reference). Mesh axes that shard both tokens and experts (`gather`, e.g. `expert`) form the
exchange group of size G; expert axes that do not shard tokens (`rest`) see the same tokens on
every device, so each device keeps only the copies whose expert lives on its `rest` coordinate
and the partial outputs are psum'd over `rest` afterwards (in `moe.routed_experts`). Per device:

1. one row per (token, destination device) pair that has any of the token's k copies there, with
   the k expert slots (local id, or E_local = not there) and gate weights: a token is sent once
   per device, not once per copy (k*(G-1)/G copies vs at most G-1 pairs: fewer bytes than a
   per-copy exchange whenever a device holds two of a token's experts);
2. exchange row counts (small `all_to_all`), then rows, ids and weights; the receiver runs its
   experts on the rows (`moe_dispatch.local_experts`, combining the copies it holds), sends one
   output row per pair back by the reverse exchange; the owner sums its tokens' rows.

Row exchange, chosen by `exchange` ("auto": ragged off CPU, padded on CPU):
- "ragged": `jax.lax.ragged_all_to_all` (TPU v4+/GPU; XLA:CPU lacks it) sends only real pairs;
  the receive buffer holds the worst case, G*n rows (every token of the group has a copy here),
  so nothing can overflow: exactly dropless.
- "padded": `jax.lax.all_to_all` of fixed [G, n, D] blocks, also the worst case: exactly
  dropless, but it moves G*n rows per device whatever the routing, the all-gather path's volume.
  There is no capacity-bounded variant: token dropping stays `moe_impl="capacity"`.
The local compute sees G*n rows with k slots each, as on the all-gather path.
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
    return "padded" if moe_dispatch.target_platform() == "cpu" else "ragged"
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
  d = x.shape[1]
  num_local = wg.shape[0]
  size = math.prod(jax.lax.axis_size(a) for a in gather)
  rest = tuple(a for a in exp_axes if a not in gather)
  dest, dest_rest = _split_shard(idx // num_local, exp_axes, gather)
  mine = dest_rest == _index(rest) if rest else jnp.ones(idx.shape, bool)  # [n, k]
  # One row per (token, destination device) pair that has copies there: [n, G, k] masks.
  here = (dest[:, None, :] == jnp.arange(size)[None, :, None]) & mine[:, None, :]
  present = jnp.any(here, axis=-1)  # [n, G]
  order = jnp.argsort(jnp.where(present, jnp.arange(size)[None, :], size).reshape(-1),
                      stable=True)  # Pairs t*G + j grouped by destination j; absent pairs last.
  send = jnp.sum(present, axis=0).astype(jnp.int32)  # [G] rows to each device.
  recv = jax.lax.all_to_all(send, gather, 0, 0, tiled=True)  # [G] rows from each device.
  token = order // size
  xs = jnp.take(x, token, axis=0)
  sel = here.reshape(n * size, k)[order]
  ids = jnp.where(sel, idx[token] % num_local, num_local).astype(jnp.int32)  # L = not here.
  ws = jnp.where(sel, w[token], 0).astype(w.dtype)
  buf_rows = size * n  # Worst case: every token of the group has copies on this device.
  if exchange == "ragged":
    a2a = jax.lax.ragged_all_to_all if ragged_fn is None else ragged_fn
    in_off = jnp.cumsum(send) - send
    table = jax.lax.all_gather(send, gather)  # [source, destination] row counts.
    out_off = (jnp.cumsum(table, axis=0) - table)[_index(gather)]

    def there(a: jax.Array, fill: float | int) -> jax.Array:
      out = jnp.full((buf_rows,) + a.shape[1:], fill, a.dtype)
      return a2a(a, out, in_off, send, out_off, recv, axis_name=gather)

    rows = moe_dispatch.local_experts(impl, there(xs, 0), there(ids, num_local), there(ws, 0),
                                      wg, wu, wd, 0, block_size)
    recv_off = jnp.cumsum(recv) - recv
    back_off = jax.lax.all_to_all(in_off, gather, 0, 0, tiled=True)  # My rows in each source.
    per_pair = a2a(rows, jnp.zeros((n * size, d), rows.dtype), recv_off, recv, back_off, send,
                   axis_name=gather)
  else:
    start = jnp.cumsum(send) - send
    sorted_dest = jnp.searchsorted(jnp.cumsum(send), jnp.arange(n * size), side="right")
    safe = jnp.minimum(sorted_dest, size - 1)  # Row r of the sorted pairs -> slot in [G, n].
    slot = jnp.where(sorted_dest < size, safe * n + jnp.arange(n * size) - start[safe], buf_rows)

    def there(a: jax.Array, fill: float | int) -> jax.Array:
      out = jnp.full((buf_rows,) + a.shape[1:], fill, a.dtype).at[slot].set(a, mode="drop")
      out = jax.lax.all_to_all(out.reshape((size, n) + a.shape[1:]), gather, 0, 0, tiled=True)
      return out.reshape((buf_rows,) + a.shape[1:])

    rows = moe_dispatch.local_experts(impl, there(xs, 0), there(ids, num_local), there(ws, 0),
                                      wg, wu, wd, 0, block_size)
    rows = jax.lax.all_to_all(rows.reshape(size, n, d), gather, 0, 0, tiled=True)
    per_pair = jnp.take(rows.reshape(buf_rows, d), slot, axis=0, mode="fill", fill_value=0)
  # Un-sort the pairs and sum each token's per-device partial outputs.
  per_pair = per_pair[jnp.argsort(order)].reshape(n, size, d)
  return jnp.sum(per_pair, axis=1, dtype=jnp.float32).astype(x.dtype)

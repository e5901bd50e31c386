"""Minibatches formed by trajectories: a fixed number of optimizer updates per RL step.

With `rl.updates_per_step = N` (> 0) an element's trajectories are dealt into N minibatches (all
chunks of a trajectory in the same one, balanced by loss tokens, seeded), each packed into its own
rows, padded to a multiple of the micro-batch rows (`data.batch_size / rl.minibatches`, the
jitted step's shape). One update = the micro-batches of one minibatch, gradients summed with the
minibatch's loss denominator (`loss_denominator`), then one optimizer update: an element gets
exactly `ppo_epochs x N` updates however many chunks its rollouts split into, and the LR schedule
(counted in optimizer updates) is stretched by exactly that (rl/train.py). Without it
(`updates_per_step = 0`) an element gets ceil(loss rows / micro rows) updates per epoch
(rl/step.py `update_plan`), which grows with the chunks per rollout. Numpy only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from klong_jax.data import packing
from klong_jax.data.schema import Chunk


def element_rng(seed: int, key: str) -> np.random.Generator:
  """A generator seeded by (seed, key): the same element deals the same way after a restart."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])


def deal(loss_tokens: Sequence[int], n: int, rng: np.random.Generator) -> list[list[int]]:
  """Trajectory indices of each of `n` minibatches: a seeded shuffle, then longest first to the
  minibatch with the fewest loss tokens so far (ties: the lowest index). Every trajectory lands
  in exactly one minibatch; with fewer trajectories than `n` some minibatches stay empty."""
  if n < 1:
    raise ValueError(f"rl.updates_per_step must be >= 1 to deal trajectories, got {n}")
  order = rng.permutation(len(loss_tokens))
  order = sorted(order.tolist(), key=lambda i: -int(loss_tokens[i]))  # stable: ties shuffled
  load, out = [0] * n, [[] for _ in range(n)]
  for i in order:
    j = int(np.argmin(load))
    out[j].append(i)
    load[j] += int(loss_tokens[i])
  return [sorted(m) for m in out]


def pack_minibatches(per_traj: Sequence[Sequence[Chunk]], n: int, micro_rows: int,
                     row_len: int, rng: np.random.Generator,
                     routing_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Packs each minibatch's chunks into its own rows, padded to a multiple of `micro_rows`;
  rows get `minibatch` [rows] int32 (its index). An empty minibatch gets no rows."""
  loss = [sum(int(c.loss_mask.sum()) for c in chunks) for chunks in per_traj]
  parts = []
  for j, members in enumerate(deal(loss, n, rng)):
    chunks = [c for i in members for c in per_traj[i]]
    if not chunks:
      continue
    rows = packing.pack_chunks(chunks, row_len, routing_shape=routing_shape)
    k = rows["tokens"].shape[0]
    pad = packing.empty_rows(-k % micro_rows, row_len, routing_shape)
    rows = {key: np.concatenate([rows[key], pad[key]]) for key in rows}
    rows["minibatch"] = np.full((rows["tokens"].shape[0],), j, np.int32)
    parts.append(rows)
  if not parts:
    rows = packing.empty_rows(0, row_len, routing_shape)
    rows["minibatch"] = np.zeros((0,), np.int32)
    return rows
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def loss_weights(segment_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
  """The loss weights on logits positions, as `train.losses.shift_targets` computes them."""
  seg, mask = np.asarray(segment_ids), np.asarray(loss_mask)
  valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0) & (mask[:, 1:] > 0)
  return np.concatenate([valid, np.zeros_like(valid[:, :1])], axis=1).astype(np.float32)


def loss_denominator(segment_ids: np.ndarray, loss_mask: np.ndarray, normalization: str) -> float:
  """What one update's loss is divided by (rl/losses.py `_normalize` over the whole minibatch):
  its loss tokens ("token") or its chunks with loss tokens ("sequence")."""
  w = loss_weights(segment_ids, loss_mask)
  if normalization == "token":
    return float(w.sum())
  if normalization == "sequence":
    seg = np.asarray(segment_ids)
    rows = np.broadcast_to(np.arange(seg.shape[0])[:, None], seg.shape)
    return float(len({(int(r), int(s)) for r, s in zip(rows[w > 0], seg[w > 0], strict=True)}))
  raise ValueError(f"unknown loss normalization {normalization!r}; use 'token' or 'sequence'")


def update_order(n: int, epochs: int, seed: int, step: int) -> list[int]:
  """The minibatch index of each update of one element: every epoch visits the `n` minibatches
  in an order shuffled by (seed, step, epoch) (a resumed run replays the same updates)."""
  out: list[int] = []
  for epoch in range(epochs):
    out.extend(np.random.default_rng([seed, step, epoch, 1]).permutation(n).tolist())
  return out

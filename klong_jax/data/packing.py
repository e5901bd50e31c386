"""First-fit packing of chunks into fixed-length rows with segment ids: no compute wasted on pads.

Row arrays (all [rows, row_len]): tokens, positions, segment_ids (1.. per chunk, 0 = padding),
loss_mask, logprobs, advantages (the chunk's advantage on each of its tokens), policy_version.
`loss_mask[r, i] == 1` means token i is a training target (predicted from token i-1 of the same
segment); the trainer shifts and masks pairs that cross segments. With `routing_shape` (L, k),
rows also get `routing` [rows, row_len, L, k] int16: the chunks' recorded MoE expert ids for
routing replay, -1 on padding and on tokens without a record (SFT data: the router's own top-k).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from klong_jax.data.schema import Chunk

ROW_FIELDS = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
              "loss_mask": np.int32, "logprobs": np.float32, "advantages": np.float32,
              "policy_version": np.int32}
# Per-token chunk features that the Grain packer packs (it adds `<name>_segment_ids`).
CHUNK_FEATURES = ("tokens", "positions", "loss_mask", "logprobs", "advantages", "policy_version")


def chunk_features(chunk: Chunk) -> dict[str, np.ndarray]:
  """A chunk as a dict of equal-length per-token arrays (the unit that gets packed)."""
  n = len(chunk)
  pv = chunk.policy_version if chunk.policy_version is not None else np.full((n,), -1)
  return {
      "tokens": np.asarray(chunk.tokens, np.int32),
      "positions": np.asarray(chunk.positions, np.int32),
      "loss_mask": np.asarray(chunk.loss_mask, np.int32),
      "logprobs": np.asarray(chunk.logprobs, np.float32),
      "advantages": np.full((n,), chunk.advantage, np.float32),
      "policy_version": np.asarray(pv, np.int32),
  }


def empty_rows(num_rows: int, row_len: int,
               routing_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """All-padding rows (policy_version and routing padded with -1, everything else 0)."""
  rows = {k: np.zeros((num_rows, row_len), dt) for k, dt in ROW_FIELDS.items()}
  rows["policy_version"][:] = -1
  if routing_shape is not None:
    rows["routing"] = np.full((num_rows, row_len, *routing_shape), -1, np.int16)
  return rows


def pack_chunks(chunks: Iterable[Chunk], row_len: int, num_rows: int | None = None,
                routing_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Packs chunks first-fit (in order) into rows of `row_len` tokens.

  With `num_rows`, exactly that many rows are returned and a chunk that fits none is an error;
  without it, rows are opened as needed. A chunk longer than `row_len` is always an error.
  """
  placed: list[list[Chunk]] = []
  free: list[int] = []
  for c in chunks:
    n = len(c)
    if n > row_len:
      raise ValueError(f"chunk {c.chunk_index} of {c.source_id!r} has {n} tokens > row_len "
                       f"{row_len}; split with SplitConfig(max_len <= row_len)")
    for r, room in enumerate(free):
      if n <= room:
        placed[r].append(c)
        free[r] -= n
        break
    else:
      if num_rows is not None and len(placed) == num_rows:
        raise ValueError(f"chunk {c.chunk_index} of {c.source_id!r} ({n} tokens) fits none of "
                         f"the {num_rows} rows; pass more rows or fewer chunks")
      placed.append([c])
      free.append(row_len - n)
  rows = empty_rows(num_rows if num_rows is not None else len(placed), row_len, routing_shape)
  for r, row in enumerate(placed):
    at = 0
    for seg, c in enumerate(row, start=1):
      n = len(c)
      for k, v in chunk_features(c).items():
        rows[k][r, at:at + n] = v
      rows["segment_ids"][r, at:at + n] = seg
      if routing_shape is not None and c.routing is not None:
        if c.routing.shape[1:] != tuple(routing_shape):
          raise ValueError(f"chunk {c.chunk_index} of {c.source_id!r} has routing "
                           f"{c.routing.shape[1:]}, the model needs {tuple(routing_shape)}")
        rows["routing"][r, at:at + n] = c.routing
      at += n
  return rows


def rows_from_grain(packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Maps one row of grain's FirstFitPackIterDataset (`chunk_features` packed) to row fields."""
  out = {k: np.asarray(packed[k], ROW_FIELDS[k]) for k in CHUNK_FEATURES}
  out["segment_ids"] = np.asarray(packed["tokens_segment_ids"], np.int32)
  out["policy_version"] = np.where(out["segment_ids"] > 0, out["policy_version"], -1)
  return out

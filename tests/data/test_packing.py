"""Packing: packed per-token data equals per-chunk data; a packed loss equals the per-chunk sum."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_jax.data.packing import pack_chunks
from klong_jax.data.schema import Chunk


def make_chunks(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    out.append(Chunk(tokens=rng.integers(1, 50, n).astype(np.int32),
                     positions=np.arange(n, dtype=np.int32) + 3 * i,
                     loss_mask=rng.integers(0, 2, n).astype(np.int32),
                     logprobs=-rng.random(n).astype(np.float32), advantage=float(i) - 1.5,
                     source_id=f"s{i}", chunk_index=0,
                     policy_version=np.full(n, i, np.int32)))
  return out


def toy_loss_rows(rows, table):
  """Sum over loss tokens of -log table[prev_token, token] within segments (next-token style)."""
  tok, seg, m = rows["tokens"], rows["segment_ids"], rows["loss_mask"]
  valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (m[:, 1:] == 1)
  adv = rows["advantages"][:, 1:]
  return float((-np.log(table[tok[:, :-1], tok[:, 1:]]) * adv * valid).sum())


def toy_loss_chunk(c, table):
  t = c.tokens
  return float((-np.log(table[t[:-1], t[1:]]) * c.advantage * (c.loss_mask[1:] == 1)).sum())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=20), st.integers(32, 64))
def test_packed_data_equals_chunk_data(lengths, row_len):
  chunks = make_chunks(lengths)
  rows = pack_chunks(chunks, row_len)
  assert all(v.shape == rows["tokens"].shape for v in rows.values())
  assert rows["tokens"].shape[1] == row_len
  seen = []
  for r in range(rows["tokens"].shape[0]):
    seg = rows["segment_ids"][r]
    assert np.all(np.diff(seg[seg > 0]) >= 0)  # segments contiguous, 1.. in order
    for s in np.unique(seg[seg > 0]):
      sel = seg == s
      seen.append({k: v[r][sel] for k, v in rows.items()})
    pad = seg == 0
    assert not rows["loss_mask"][r][pad].any() and (rows["tokens"][r][pad] == 0).all()
  by_key = sorted(seen, key=lambda d: d["policy_version"][0])
  assert len(by_key) == len(chunks)
  for c, d in zip(chunks, by_key, strict=True):
    np.testing.assert_array_equal(d["tokens"], c.tokens)
    np.testing.assert_array_equal(d["positions"], c.positions)
    np.testing.assert_array_equal(d["loss_mask"], c.loss_mask)
    np.testing.assert_array_equal(d["logprobs"], c.logprobs)
    np.testing.assert_array_equal(d["advantages"], np.full(len(c), c.advantage, np.float32))
  # The packed "loss" (segment-aware) equals the per-chunk sum.
  table = np.random.default_rng(1).random((50, 50)) + 0.1
  np.testing.assert_allclose(toy_loss_rows(rows, table),
                             sum(toy_loss_chunk(c, table) for c in chunks), rtol=1e-5)
  assert int(rows["loss_mask"].sum()) == sum(int(c.loss_mask.sum()) for c in chunks)


def test_first_fit_order_and_errors():
  rows = pack_chunks(make_chunks([6, 5, 3, 4, 2]), 10)
  # first fit: [6, 3] [5, 4] then 2 -> row 0 has room 1, row 1 room 1 -> new row.
  assert (rows["segment_ids"] > 0).sum(axis=1).tolist() == [9, 9, 2]
  with pytest.raises(ValueError, match="11 tokens > row_len 10"):
    pack_chunks(make_chunks([11]), 10)
  with pytest.raises(ValueError, match="fits none of the 1 rows"):
    pack_chunks(make_chunks([6, 6]), 10, num_rows=1)
  fixed = pack_chunks(make_chunks([3]), 10, num_rows=4)
  assert fixed["tokens"].shape == (4, 10) and (fixed["policy_version"][1:] == -1).all()

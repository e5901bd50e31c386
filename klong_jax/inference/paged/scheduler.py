"""Host-side batch building for the paged engine: which tokens run this step (the token budget),
and the numpy arrays of a ragged mixed batch or of a multi-step decode call.

A step's budget is `token_budget` tokens: every decoding row first takes its one token, then
prefilling rows (in admission order) take chunks of their remaining prompt from what is left, so
a long prompt is spread over several steps and never stalls the decoding rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from klong_jax.inference.paged.cache import TRASH_PAGE
from klong_jax.inference.sampler import RowSettings

# Smallest padded token count of a mixed step (the engine's default; the serving plan's too).
MIN_BUCKET = 16


@dataclasses.dataclass
class Work:
  """One stream sequence of a mixed step: `tokens` at positions start.. of engine row `row`;
  `sample` when its last token's logits give the row's next token."""

  row: int
  tokens: list[int]
  start: int
  pages: list[int]
  sample: bool
  counter: int


def plan_chunks(decode_rows: int, prefill_left: Sequence[int], token_budget: int) -> list[int]:
  """Chunk length per prefilling request (0: waits) after `decode_rows` single tokens."""
  left = token_budget - decode_rows
  out = []
  for n in prefill_left:
    c = max(0, min(n, left))
    out.append(c)
    left -= c
  return out


def bucket(n: int, minimum: int) -> int:
  """Smallest power of two >= max(n, minimum): the padded token count (bounds recompiles)."""
  return 1 << (max(n, minimum, 1) - 1).bit_length()


def page_table(pages: Sequence[int], width: int) -> np.ndarray:
  out = np.full(width, TRASH_PAGE, np.int32)
  out[:len(pages)] = pages
  return out


def mixed_batch(work: Sequence[Work], settings: RowSettings, num_seqs: int, pages_per_seq: int,
                min_bucket: int) -> dict[str, np.ndarray]:
  """The arrays of `mixed_step` for `work` (stream order), padded to a bucket of tokens and to
  `num_seqs` sequences."""
  n = sum(len(w.tokens) for w in work)
  t = bucket(n, min_bucket)
  tokens = np.zeros(t, np.int32)
  positions = np.zeros(t, np.int32)
  seq = np.zeros(t, np.int32)
  valid = np.zeros(t, bool)
  pages = np.full((num_seqs, pages_per_seq), TRASH_PAGE, np.int32)
  kv_lens = np.zeros(num_seqs, np.int32)
  cu = np.zeros(num_seqs + 1, np.int32)
  sample_at = np.zeros(num_seqs, np.int32)
  rows = np.zeros(num_seqs, np.int32)
  counters = np.zeros(num_seqs, np.int32)
  i = 0
  for s, w in enumerate(work):
    c = len(w.tokens)
    tokens[i:i + c] = w.tokens
    positions[i:i + c] = np.arange(w.start, w.start + c)
    seq[i:i + c] = s
    valid[i:i + c] = True
    pages[s] = page_table(w.pages, pages_per_seq)
    kv_lens[s] = w.start + c
    cu[s + 1] = cu[s] + c
    sample_at[s] = i + c - 1
    rows[s] = w.row
    counters[s] = w.counter
    i += c
  cu[len(work) + 1:] = cu[len(work)]
  sub = settings.take(rows)
  return dict(tokens=tokens, positions=positions, seq=seq, valid=valid, page_indices=pages,
              kv_lens=kv_lens, cu_q_lens=cu, num_seqs=np.asarray([len(work)], np.int32),
              sample_at=sample_at, temp=sub.temperature, top_k=sub.top_k, top_p=sub.top_p,
              seeds=sub.seed, counters=counters)


def stop_table(stop_sets: Sequence[frozenset[int]]) -> np.ndarray:
  """[rows, M] stop ids padded with -1, M a power of two >= 4 (few compiled widths)."""
  width = bucket(max([len(s) for s in stop_sets] + [1]), 4)
  out = np.full((len(stop_sets), width), -1, np.int32)
  for i, s in enumerate(stop_sets):
    out[i, :len(s)] = sorted(s)
  return out

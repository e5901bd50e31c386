"""Trajectory splitting (the KLong technique, DESIGN.md 1.3 and 4): prefix + overlapping windows.

Every chunk = the fixed prefix + a window of later history. Window i starts `overlap` tokens before
the end of window i-1 (context the previous chunk already trained); the loss mask in that overlap
is 0 (unless `train_overlap`, the paper's variant), so each loss token is trained in exactly one
chunk. The prefix's own loss tokens are trained in chunk 0 only. Window ends prefer turn starts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import numpy as np

from klong_jax.data.schema import Chunk, Trajectory


class SplitError(ValueError):
  """A trajectory that cannot be split under the config; names the trajectory and the fix."""


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How to cut trajectories into chunks of at most `max_len` tokens.

  overlap: tokens of already-trained history repeated as context at the start of each window.
  keep_positions: positions are the original token indices (default: renumbered 0..len-1).
  train_overlap: also train loss tokens inside the overlap (the paper trains them in every window).
  truncate_prefix: a prefix too long to fit keeps its first `keep_prefix_messages` messages
    (system + task) and is cut to `max_prefix_frac * max_len` tokens; the cut-off paper-reading
    tail moves into the windowed history, so nothing is dropped (logged).
  min_cut_frac: a turn-boundary cut must keep at least this fraction of a window's new room,
    otherwise the window is cut mid-turn at full length.
  """

  max_len: int
  overlap: int = 0
  keep_positions: bool = False
  train_overlap: bool = False
  truncate_prefix: bool = False
  keep_prefix_messages: int = 2
  max_prefix_frac: float = 0.5
  min_cut_frac: float = 0.5

  def __post_init__(self):
    if self.max_len < 1 or self.overlap < 0:
      raise ValueError(f"SplitConfig needs max_len >= 1 and overlap >= 0, got {self}")
    if not 0.0 <= self.min_cut_frac <= 1.0 or not 0.0 < self.max_prefix_frac < 1.0:
      raise ValueError(f"SplitConfig fractions out of range: {self}")


class Window(NamedTuple):
  """History window after the prefix: context [start, new_start), new tokens [new_start, end)."""

  start: int
  new_start: int
  end: int


def plan_windows(history_len: int, room: int, overlap: int, boundaries: list[int],
                 min_cut_frac: float = 0.5) -> list[Window]:
  """Cuts `history_len` tokens into windows of at most `room` tokens (history coordinates).

  Consecutive windows share `overlap` tokens of context; each window ends at the latest boundary
  that keeps at least `min_cut_frac` of its new room, else at full length.
  """
  if room <= overlap:
    raise ValueError(f"window room {room} must exceed overlap {overlap}")
  bounds = np.asarray(sorted(b for b in set(boundaries) if 0 < b < history_len), np.int64)
  windows, t = [], 0
  while t < history_len:
    s = max(0, t - overlap)
    limit = s + room
    if limit >= history_len:
      e = history_len
    else:
      lo = t + max(1, int(np.ceil(min_cut_frac * (limit - t))))
      cands = bounds[(bounds >= lo) & (bounds <= limit)]
      e = int(cands[-1]) if cands.size else limit
    if e <= t:  # cannot happen when room > overlap; guards against an endless loop
      raise AssertionError(f"window planning made no progress at {t}")
    windows.append(Window(s, t, e))
    t = e
  return windows


def _prefix_cut(traj: Trajectory, cfg: SplitConfig) -> int:
  """Where the kept prefix ends: `prefix_end`, or the truncation point if it must be cut."""
  p = traj.prefix_end
  if cfg.max_len - p > cfg.overlap:
    return p
  need = (f"prefix of {p} tokens leaves {cfg.max_len - p} tokens of room with max_len="
          f"{cfg.max_len}, which must exceed overlap={cfg.overlap}")
  if not cfg.truncate_prefix:
    raise SplitError(f"trajectory {traj.id!r}: {need}; raise max_len, lower overlap, or set "
                     "truncate_prefix=True to cut the paper-reading part of the prefix")
  k = cfg.keep_prefix_messages
  if len(traj.turn_starts) <= k:
    raise SplitError(f"trajectory {traj.id!r}: {need}, and truncate_prefix needs turn_starts for "
                     f"the first {k} messages (system + task), but it has {len(traj.turn_starts)}")
  keep_end = traj.turn_starts[k]
  target = int(cfg.max_prefix_frac * cfg.max_len)
  if keep_end > target or cfg.max_len - max(keep_end, 1) <= cfg.overlap:
    raise SplitError(f"trajectory {traj.id!r}: the system/task part alone is {keep_end} tokens, "
                     f"more than max_prefix_frac*max_len={target}; raise max_len")
  inside = [b for b in traj.turn_starts if keep_end <= b <= target]
  cut = max(inside) if inside and cfg.max_len - max(inside) > cfg.overlap else target
  while cfg.max_len - cut <= cfg.overlap:
    cut -= 1
  logging.warning("trajectory %r: prefix of %d tokens truncated to %d (system/task part %d "
                  "tokens kept); the cut paper-reading tail moves into the windowed history",
                  traj.id, p, cut, keep_end)
  return cut


def split_trajectory(traj: Trajectory, cfg: SplitConfig, advantage: float = 0.0) -> list[Chunk]:
  """Splits one trajectory into chunks (DESIGN.md 4); every chunk carries `advantage`."""
  n = len(traj)
  p = _prefix_cut(traj, cfg)
  history = n - p
  if history == 0:
    windows = [Window(0, 0, 0)]
  else:
    windows = plan_windows(history, cfg.max_len - p, cfg.overlap,
                           [b - p for b in traj.turn_starts], cfg.min_cut_frac)
  pv = traj.policy_version
  chunks = []
  for i, w in enumerate(windows):
    idx = np.concatenate([np.arange(p), np.arange(p + w.start, p + w.end)])
    mask = traj.loss_mask[idx].copy()
    if i > 0:
      mask[:p] = 0  # the prefix's own loss tokens are trained in chunk 0 only
    if not cfg.train_overlap:
      mask[p:p + (w.new_start - w.start)] = 0
    positions = idx if cfg.keep_positions else np.arange(idx.shape[0])
    chunks.append(Chunk(
        tokens=traj.tokens[idx].astype(np.int32), positions=positions.astype(np.int32),
        loss_mask=mask.astype(np.int32), logprobs=traj.logprobs[idx].astype(np.float32),
        advantage=float(advantage), source_id=traj.id, chunk_index=i,
        policy_version=None if pv is None else pv[idx].astype(np.int32)))
  return chunks

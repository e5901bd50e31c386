"""Trajectory splitting (the KLong technique, DESIGN.md 1.3 and 4): prefix + overlapping windows.

Every chunk = the fixed prefix + a window of later history, planned by the context policy that
the agent followed while sampling (data/context.py), so an action is trained on exactly the
context it was generated under. The loss mask in a window's overlap is 0 (unless
`train_overlap`, the paper's variant), so each loss token is trained in exactly one chunk; the
prefix's own loss tokens are trained in chunk 0 only. The prefix is never cut: a prefix that
leaves no room is an error (inference would keep the paper, so training must too).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klong_jax.data.context import ContextError, ContextPolicy, Window
from klong_jax.data.schema import Chunk, Trajectory


class SplitError(ValueError):
  """A trajectory that cannot be split under the config; names the trajectory and the fix."""


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How to cut trajectories into chunks of at most `max_len` tokens (= the agent's context).

  overlap, completion_tokens: the context policy's (data/context.py); set them to the values the
    rollouts were sampled with (workers' context_overlap and max_completion_tokens).
  keep_positions: positions are the original token indices (default: renumbered 0..len-1).
  train_overlap: also train loss tokens inside the overlap (the paper trains them in every window).
  truncate: the "no splitting" baseline of the paper's ablation: one chunk, the first `max_len`
    tokens; the rest of the trajectory is never trained.
  """

  max_len: int
  overlap: int = 0
  completion_tokens: int = 0
  keep_positions: bool = False
  train_overlap: bool = False
  min_new_frac: float = 0.1
  truncate: bool = False

  def __post_init__(self):
    self.policy  # noqa: B018 - validates the fields

  @property
  def policy(self) -> ContextPolicy:
    try:
      return ContextPolicy(self.max_len, self.overlap, self.completion_tokens, self.min_new_frac)
    except ContextError as e:
      raise ValueError(f"SplitConfig: {e}") from None


def _history(traj: Trajectory) -> tuple[list[int], list[bool], list[bool]]:
  """(lengths, is_action, can_start) of the messages after the prefix (turn_starts order)."""
  p, n = traj.prefix_end, len(traj)
  roles = ([m.get("role") for m in traj.messages]
           if len(traj.messages) == len(traj.turn_starts) else [None] * len(traj.turn_starts))
  joined = set(traj.joined)
  marks = [(b, r != "tool" and i not in joined)
           for i, (b, r) in enumerate(zip(traj.turn_starts, roles, strict=True)) if p <= b < n]
  if not marks or marks[0][0] > p:  # History not starting on a recorded message start.
    marks.insert(0, (p, True))
  ends = [b for b, _ in marks[1:]] + [n]
  lengths = [e - b for (b, _), e in zip(marks, ends, strict=True)]
  is_action = [bool(traj.loss_mask[b:e].any()) for (b, _), e in zip(marks, ends, strict=True)]
  return lengths, is_action, [ok for _, ok in marks]


def plan_chunks(traj: Trajectory, cfg: SplitConfig) -> list[Window]:
  """The history windows of `traj` under the config's context policy (SplitError if none fit)."""
  lengths, is_action, can_start = _history(traj)
  try:
    return cfg.policy.plan(traj.prefix_end, lengths, is_action, can_start)
  except ContextError as e:
    raise SplitError(f"trajectory {traj.id!r}: {e}") from None


def split_trajectory(traj: Trajectory, cfg: SplitConfig, advantage: float = 0.0) -> list[Chunk]:
  """Splits one trajectory into chunks (DESIGN.md 4); every chunk carries `advantage`."""
  p = traj.prefix_end
  if cfg.truncate:
    if p > cfg.max_len:  # The agent never cuts the prefix (data/context.py): neither may we.
      raise SplitError(f"trajectory {traj.id!r}: truncate=True keeps the first max_len="
                       f"{cfg.max_len} tokens, but the fixed prefix alone is {p} tokens (the "
                       "agent keeps the whole prefix); raise max_len above the prefix")
    windows = [Window(0, 0, max(0, min(len(traj), cfg.max_len) - p))]
  else:
    windows = plan_chunks(traj, cfg)
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
        policy_version=None if pv is None else pv[idx].astype(np.int32),
        routing=None if traj.routing is None else traj.routing[idx]))
  return chunks

"""Trajectory splitting: property tests of KLong invariants, loss accounting, prefix handling."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_jax.data.schema import Trajectory
from klong_jax.data.splitting import SplitConfig, SplitError, plan_windows, split_trajectory


def make_traj(n, prefix_end, mask, turn_starts, tid="t0"):
  rng = np.random.default_rng(n)
  return Trajectory(
      id=tid, task_id="task", tokens=rng.integers(0, 1000, n).astype(np.int32),
      loss_mask=np.asarray(mask, np.int32), logprobs=-rng.random(n).astype(np.float32),
      policy_version=np.arange(n, dtype=np.int32), prefix_end=prefix_end,
      turn_starts=sorted(set(turn_starts)))


@st.composite
def cases(draw):
  n = draw(st.integers(1, 300))
  p = draw(st.integers(0, min(n, 60)))
  mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
  turns = draw(st.lists(st.integers(0, n), max_size=40))
  overlap = draw(st.integers(0, 40))
  max_len = draw(st.integers(p + overlap + 1, p + overlap + 120))
  cfg = SplitConfig(max_len=max_len, overlap=overlap, keep_positions=True,
                    min_cut_frac=draw(st.sampled_from([0.0, 0.5, 1.0])))
  return make_traj(n, p, mask, turns + [p]), cfg


@settings(max_examples=300, deadline=None)
@given(cases())
def test_split_invariants(case):
  traj, cfg = case
  p = traj.prefix_end
  chunks = split_trajectory(traj, cfg, advantage=0.25)
  trained = np.zeros(len(traj), np.int64)
  last_end = p
  for i, c in enumerate(chunks):
    assert c.chunk_index == i and c.source_id == traj.id and c.advantage == 0.25
    assert len(c) <= cfg.max_len
    src = c.positions  # keep_positions: the original token indices
    assert src[:p].tolist() == list(range(p))  # every chunk starts with the prefix
    body = src[p:]
    assert np.all(np.diff(body) == 1)  # order preserved, contiguous window
    if body.size:
      assert body[0] <= last_end and body[-1] + 1 > last_end  # overlaps previous, makes progress
      assert last_end - body[0] <= cfg.overlap
      last_end = body[-1] + 1
    np.testing.assert_array_equal(c.tokens, traj.tokens[src])
    np.testing.assert_array_equal(c.logprobs, traj.logprobs[src])
    np.testing.assert_array_equal(c.policy_version, traj.policy_version[src])
    assert np.all(c.loss_mask <= traj.loss_mask[src])
    np.add.at(trained, src[c.loss_mask == 1], 1)
  assert last_end == len(traj) or len(traj) == p
  # Every loss token of the source trained in exactly one chunk, nothing else trained.
  np.testing.assert_array_equal(trained, traj.loss_mask)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_loss_accounting_and_renumbered_positions(case):
  traj, cfg = case
  chunks = split_trajectory(traj, dataclasses.replace(cfg, keep_positions=False))
  assert sum(int(c.loss_mask.sum()) for c in chunks) == traj.num_loss_tokens
  for c in chunks:
    assert c.positions.tolist() == list(range(len(c)))


def test_cuts_prefer_turn_boundaries():
  n, p = 100, 10
  traj = make_traj(n, p, [1] * n, [0, p, 30, 47, 52, 80, 95])
  chunks = split_trajectory(traj, SplitConfig(max_len=60, overlap=5, keep_positions=True))
  ends = [int(c.positions[-1]) + 1 for c in chunks]
  # Room 50: first window [10, 60) cuts at turn 52; next [47, 97) cuts at 95; then the rest.
  assert ends == [52, 95, 100]
  starts = [int(c.positions[p]) for c in chunks]
  assert starts == [10, 47, 90]


def test_mid_turn_cut_when_no_boundary_in_window():
  traj = make_traj(50, 5, [1] * 50, [0, 5])
  chunks = split_trajectory(traj, SplitConfig(max_len=25, overlap=4, keep_positions=True))
  assert [len(c) for c in chunks][:2] == [25, 25]


def test_train_overlap_trains_overlap_tokens_again():
  traj = make_traj(120, 10, [1] * 120, [0, 10])
  base = split_trajectory(traj, SplitConfig(max_len=40, overlap=8))
  paper = split_trajectory(traj, SplitConfig(max_len=40, overlap=8, train_overlap=True))
  extra = sum(int(c.loss_mask.sum()) for c in paper) - sum(int(c.loss_mask.sum()) for c in base)
  assert extra == 8 * (len(paper) - 1)


def test_prefix_too_long_is_a_clear_error_unless_truncated(caplog):
  n = 200
  mask = [0] * 20 + [1] * 180
  traj = make_traj(n, 150, mask, [0, 8, 20, 60, 100, 150, 170], tid="long-prefix")
  with pytest.raises(SplitError, match="'long-prefix'.*prefix of 150 tokens.*truncate_prefix"):
    split_trajectory(traj, SplitConfig(max_len=128, overlap=16))
  cfg = SplitConfig(max_len=128, overlap=16, truncate_prefix=True, keep_positions=True)
  chunks = split_trajectory(traj, cfg)
  assert "truncated to 60" in caplog.text
  assert all(c.positions[:60].tolist() == list(range(60)) for c in chunks)  # system+task kept
  assert all(len(c) <= 128 for c in chunks)
  trained = np.zeros(n, int)
  for c in chunks:
    np.add.at(trained, c.positions[c.loss_mask == 1], 1)
  np.testing.assert_array_equal(trained, traj.loss_mask)  # nothing lost: tail moved to history
  with pytest.raises(SplitError, match="system/task part alone is 100 tokens"):
    split_trajectory(traj, dataclasses.replace(cfg, keep_prefix_messages=4))


def test_plan_windows_rejects_overlap_ge_room():
  with pytest.raises(ValueError, match="must exceed overlap"):
    plan_windows(10, 4, 4, [])
  assert plan_windows(10, 4, 0, []) == [(0, 0, 4), (4, 4, 8), (8, 8, 10)]


def test_prefix_only_trajectory_is_one_chunk():
  traj = make_traj(12, 12, [0] * 6 + [1] * 6, [0, 6])
  (c,) = split_trajectory(traj, SplitConfig(max_len=16))
  assert c.loss_mask.sum() == 6 and len(c) == 12

"""Trajectory splitting: property tests of KLong invariants, loss accounting, prefix handling."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_jax.data.context import ContextPolicy
from klong_jax.data.schema import Trajectory
from klong_jax.data.splitting import SplitConfig, SplitError, plan_chunks, split_trajectory


def make_traj(n, prefix_end, mask, turn_starts, tid="t0", roles=None):
  rng = np.random.default_rng(n)
  starts = sorted(set(turn_starts))
  msgs = [{"role": r, "content": ""} for r in roles] if roles else []
  return Trajectory(
      id=tid, task_id="task", tokens=rng.integers(0, 1000, n).astype(np.int32),
      loss_mask=np.asarray(mask, np.int32), logprobs=-rng.random(n).astype(np.float32),
      policy_version=np.arange(n, dtype=np.int32), prefix_end=prefix_end,
      turn_starts=starts, messages=msgs)


def agent_traj(prefix, units, tid="t0"):
  """Prefix of `prefix` tokens, then (assistant len, [tool lens...]) units; 1 header token."""
  starts, roles, mask = [0], ["system"], [0] * prefix
  for act, tools in units:
    starts.append(len(mask))
    roles.append("assistant")
    mask += [0] + [1] * (act - 1)
    for t in tools:
      starts.append(len(mask))
      roles.append("tool")
      mask += [0] * t
  return make_traj(len(mask), prefix, mask, starts, tid, roles)


@st.composite
def cases(draw):
  p = draw(st.integers(1, 60))
  overlap = draw(st.integers(0, 40))
  max_len = draw(st.integers(p + overlap + 30, p + overlap + 160))
  units = draw(st.lists(st.tuples(st.integers(2, 25), st.lists(st.integers(1, 12), max_size=2)),
                        max_size=25))
  cfg = SplitConfig(max_len=max_len, overlap=overlap, keep_positions=True, min_new_frac=0.0)
  return agent_traj(p, units), cfg


@settings(max_examples=300, deadline=None)
@given(cases())
def test_split_invariants(case):
  traj, cfg = case
  p = traj.prefix_end
  chunks = split_trajectory(traj, cfg, advantage=0.25)
  trained = np.zeros(len(traj), np.int64)
  last_end = p
  tool_starts = {b for b, m in zip(traj.turn_starts, traj.messages, strict=True)
                 if m["role"] == "tool"}
  for i, c in enumerate(chunks):
    assert c.chunk_index == i and c.source_id == traj.id and c.advantage == 0.25
    assert len(c) <= cfg.max_len
    src = c.positions  # keep_positions: the original token indices
    assert src[:p].tolist() == list(range(p))  # every chunk starts with the prefix
    body = src[p:]
    assert np.all(np.diff(body) == 1)  # order preserved, contiguous window
    if body.size:
      assert int(body[0]) in set(traj.turn_starts) - tool_starts  # never opens on a tool result
      assert last_end - body[0] <= cfg.overlap  # repeats at most `overlap` tokens
      last_end = max(last_end, int(body[-1]) + 1)
    np.testing.assert_array_equal(c.tokens, traj.tokens[src])
    np.testing.assert_array_equal(c.logprobs, traj.logprobs[src])
    np.testing.assert_array_equal(c.policy_version, traj.policy_version[src])
    assert np.all(c.loss_mask <= traj.loss_mask[src])
    np.add.at(trained, src[c.loss_mask == 1], 1)
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


@settings(max_examples=200, deadline=None)
@given(cases())
def test_each_action_is_trained_on_the_context_the_live_policy_gives(case):
  """Replays the agent's turn-by-turn rule and checks each action's chunk context equals it."""
  traj, cfg = case
  pol, p = cfg.policy, traj.prefix_end
  bounds = [b - p for b in traj.turn_starts if b >= p] + [len(traj) - p]
  can = [m["role"] != "tool" for m in traj.messages[1:]]
  chunks = split_trajectory(traj, cfg)
  ws = 0
  for j, m in enumerate(traj.messages[1:]):
    if m["role"] != "assistant":
      continue
    ws = pol.window_start(p, bounds, can, ws, j, bounds[j + 1] - bounds[j])
    want = np.concatenate([np.arange(p), np.arange(p + bounds[ws], p + bounds[j + 1])])
    holder = [c for c in chunks if c.loss_mask.sum() and np.isin(p + bounds[j] + 1,
                                                                  c.positions[c.loss_mask == 1])]
    if bounds[j + 1] - bounds[j] > 1:  # actions with loss tokens
      (c,) = holder
      np.testing.assert_array_equal(c.positions[:len(want)], want)


def test_windows_switch_only_when_the_reply_budget_no_longer_fits():
  # prefix 10, max_len 60, reply budget 8 + 2: an action needs its context <= 40 history tokens.
  traj = agent_traj(10, [(6, [10])] * 8)
  cfg = SplitConfig(max_len=60, overlap=20, completion_tokens=8, keep_positions=True,
                    min_new_frac=0.0)
  wins = plan_chunks(traj, cfg)
  # Units of 16 tokens: actions at 0, 16, 32 fit (context 32 <= 40); the one at 48 opens a
  # window at 32 (the earliest unit start within 20 tokens before it), which then holds the
  # actions at 48 and 64 (context 32), and so on; each window ends after its last action.
  assert wins == [(0, 0, 38), (32, 48, 70), (64, 80, 102), (96, 112, 118)]


def test_reply_budget_and_overlap_must_leave_room():
  traj = agent_traj(100, [(5, [5])] * 3, tid="tight")
  with pytest.raises(SplitError, match="'tight'.*prefix is 100 tokens.*raise max_len"):
    split_trajectory(traj, SplitConfig(max_len=160, overlap=40, completion_tokens=30))
  with pytest.raises(ValueError, match="overlap >= 0"):
    ContextPolicy(max_len=10, overlap=-1)


def test_prefix_is_never_cut():
  traj = make_traj(200, 150, [0] * 20 + [1] * 180, [0, 8, 20, 60, 100, 150, 170], tid="long")
  with pytest.raises(SplitError, match="'long'.*prefix is 150 tokens.*never cut"):
    split_trajectory(traj, SplitConfig(max_len=128, overlap=16))


def test_action_larger_than_a_window_is_a_clear_error():
  traj = agent_traj(10, [(5, [3]), (80, [])], tid="big")
  with pytest.raises(SplitError, match="'big'.*action of 80 tokens"):
    split_trajectory(traj, SplitConfig(max_len=64, overlap=4, min_new_frac=0.0))


def test_train_overlap_trains_overlap_tokens_again():
  traj = agent_traj(10, [(6, [2])] * 20)
  base = split_trajectory(traj, SplitConfig(max_len=40, overlap=8, min_new_frac=0.0))
  paper = split_trajectory(traj, SplitConfig(max_len=40, overlap=8, train_overlap=True,
                                             min_new_frac=0.0))
  extra = sum(int(c.loss_mask.sum()) for c in paper) - sum(int(c.loss_mask.sum()) for c in base)
  assert len(base) > 3 and extra == 5 * (len(paper) - 1)  # one 5-token action per overlap


def test_prefix_only_trajectory_is_one_chunk():
  traj = make_traj(12, 12, [0] * 6 + [1] * 6, [0, 6])
  (c,) = split_trajectory(traj, SplitConfig(max_len=16, min_new_frac=0.0))
  assert c.loss_mask.sum() == 6 and len(c) == 12


def test_truncate_baseline_keeps_only_the_first_max_len_tokens():
  traj = agent_traj(10, [(6, [2])] * 20)
  (c,) = split_trajectory(traj, SplitConfig(max_len=40, overlap=8, truncate=True,
                                            min_new_frac=0.0))
  np.testing.assert_array_equal(c.tokens, traj.tokens[:40])
  assert c.loss_mask.sum() == traj.loss_mask[:40].sum() < traj.num_loss_tokens


def test_truncate_never_cuts_the_prefix():
  traj = agent_traj(30, [(6, [2])] * 4)  # A 30-token prefix: the agent always keeps it whole.
  with pytest.raises(SplitError, match="fixed prefix alone is 30 tokens"):
    split_trajectory(traj, SplitConfig(max_len=20, truncate=True, min_new_frac=0.0))


def test_windows_never_start_at_joined_messages():
  """A message whose role token the previous action generated (GLM, `Trajectory.joined`) cannot
  open a window: the window opens at the next startable message instead (here the action)."""
  # prefix 10; action 20 (its last token is the user message's role token), user 30, action 20.
  starts, roles = [0, 10, 30, 60], ["system", "assistant", "user", "assistant"]
  mask = [0] * 10 + [0] + [1] * 19 + [0] * 30 + [0] + [1] * 19
  traj = make_traj(80, 10, mask, starts, roles=roles)
  cfg = SplitConfig(max_len=10 + 60, overlap=40, completion_tokens=0, min_new_frac=0.0)
  assert [w.start for w in plan_chunks(traj, cfg)] == [0, 20]  # opens at the user message
  traj.joined = [2]
  assert [w.start for w in plan_chunks(traj, cfg)] == [0, 50]  # opens at the action itself
  from klong_jax.data import schema
  again = schema.from_bytes(traj.to_bytes())  # `joined` survives serialization
  assert again.joined == [2] and "joined" not in make_traj(80, 10, mask, starts).to_json()
  assert split_trajectory(again, cfg)[1].tokens[10:].tolist() == traj.tokens[60:].tolist()

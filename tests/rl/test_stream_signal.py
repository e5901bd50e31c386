"""Coverage and signal in the RL stream (issue #31): dynamic sampling drops zero-variance groups
and refills the batch, turns cut at the token limit get no loss, and a step's groups mix families.
"""

import json

import pytest

from klong_jax.data import schema, shards
from klong_jax.data.splitting import SplitConfig
from klong_jax.rl.stream_source import StreamConfig, StreamDataset
from tests.rl.fakes import make_trajectory, write_group


def _cfg(stream, **kw):
  base = dict(stream=str(stream), batch_size=64, row_len=128, split=SplitConfig(max_len=128),
              groups_per_step=2, max_staleness=1, poll_s=0.01, wait_timeout_s=1.0)
  base.update(kw)
  return StreamConfig(**base)


def _publish_mixed(root):
  write_group(str(root), 0, "a", [1.0, 0.0], 0, seed=1)            # signal
  write_group(str(root), 0, "z", [0.5, 0.5, None], 0, seed=2)      # zero variance (+ infra)
  write_group(str(root), 0, "b", [1.0, 0.0, 0.5], 0, seed=3)       # signal
  write_group(str(root), 0, "y", [0.0, 0.0], 0, seed=4)            # zero variance


def test_zero_variance_groups_leave_batch_and_denominator_and_batch_is_refilled(tmp_path):
  _publish_mixed(tmp_path)
  it = iter(StreamDataset(_cfg(tmp_path, dynamic_sampling=True)))
  b = next(it)
  ids = it.last_info["ids"]
  assert sorted({i.rsplit("-", 1)[0] for i in ids}) == ["ta-s0", "tb-s0"]  # z skipped, b read
  assert it.last_info["dropped_zero_var"] == 1
  assert it.counters["dropped_zero_var"] == 1 and it.counters["dropped_zero_var_trajectories"] == 2
  assert it.counters["groups"] == 2
  # The loss denominator (token-mean: the batch's loss tokens) holds only a's and b's tokens.
  assert int(b["loss_mask"].sum()) == 5 * 40
  assert (b["advantages"][b["loss_mask"] > 0] != 0).any()
  # Off: the zero-variance group fills the batch (its 2 valid rollouts' tokens in the denominator).
  off = iter(StreamDataset(_cfg(tmp_path, dynamic_sampling=False)))
  b_off = next(off)
  assert int(b_off["loss_mask"].sum()) == 4 * 40 and off.counters["dropped_zero_var"] == 0
  assert sorted({i.rsplit("-", 1)[0] for i in off.last_info["ids"]}) == ["ta-s0", "tz-s0"]


def test_dynamic_sampling_bound_and_restore(tmp_path):
  for i in range(3):
    write_group(str(tmp_path), 0, f"z{i}", [0.0, 0.0], 0, seed=10 + i)
  cfg = _cfg(tmp_path, groups_per_step=1, dynamic_sampling=True, dynamic_sampling_max_reads=2)
  it = iter(StreamDataset(cfg))
  next(it)
  # Two reads without signal: the element takes the first one read; the second is dropped.
  assert it.last_info["ids"][0].startswith("tz0") and it.counters["zero_var_kept"] == 1
  assert it.counters["dropped_zero_var"] == 1
  state = json.loads(json.dumps(it.get_state()))
  it2 = iter(StreamDataset(cfg))
  it2.set_state(state)
  assert it2.counters["dropped_zero_var"] == 1
  write_group(str(tmp_path), 0, "s", [1.0, 0.0], 0, seed=20)
  next(it), next(it2)
  assert it.last_info["ids"] == it2.last_info["ids"] and it.last_info["ids"][0].startswith("ts")
  same = lambda c: {k: v for k, v in c.items() if k != "wait_s"}  # noqa: E731
  assert same(it.counters) == same(it2.counters) and it.counters["dropped_zero_var"] == 2


def _cut_group(root, cut):
  t0 = make_trajectory("g-0", "g", 1.0, 0, seed=1)
  t1 = make_trajectory("g-1", "g", 0.0, 0, seed=2)
  t0.cut_turns = cut  # the fake's first policy turn: tokens 20..29, then 60..69
  (root / "0").mkdir()
  shards.write_shard(str(root / "0" / "g.array_record"), [t0.to_bytes(), t1.to_bytes()])


@pytest.mark.parametrize("rule", ["mask", "train"])
def test_turns_cut_at_the_token_limit_get_no_loss(tmp_path, rule):
  _cut_group(tmp_path, [[20, 40], [60, 70]])
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, length_cut=rule)))
  b = next(it)
  if rule == "mask":
    assert int(b["loss_mask"].sum()) == 2 * 40 - 20
    assert it.counters["cut_turns_masked"] == 2 and it.counters["cut_tokens_masked"] == 20
    # The masked tokens are exactly the cut turns' sampled tokens of g-0 (its advantage +0.5).
    pos = b["advantages"] > 0
    assert int((b["loss_mask"] * pos).sum()) == 20
  else:
    assert int(b["loss_mask"].sum()) == 2 * 40 and it.counters["cut_turns_masked"] == 0


def test_cut_turns_round_trip_and_bad_spans_are_named():
  t = make_trajectory("r", "g", 1.0, 0)
  t.cut_turns = [[20, 30]]
  assert schema.from_bytes(t.to_bytes()).cut_turns == [[20, 30]]
  assert "cut_turns" not in make_trajectory("r", "g", 1.0, 0).to_json()  # old records unchanged
  rec = dict(t.to_json(), cut_turns=[[30, 20]])
  with pytest.raises(schema.TrajectoryError, match="cut_turns"):
    schema.validate(rec)


def test_groups_of_one_step_mix_families(tmp_path):
  for i, fam in enumerate(["arith", "arith", "fib", "fib"]):
    write_group(str(tmp_path), 0, f"{fam}{i}", [1.0, 0.0], 0, seed=30 + i,
                metadata={"family": fam})
  def elements(lookahead):
    it = iter(StreamDataset(_cfg(tmp_path, family_lookahead=lookahead)))
    out = []
    for _ in range(2):
      next(it)
      out.append(sorted({i.split("-")[0][1:] for i in it.last_info["ids"]}))
    return out
  assert elements(4) == [["arith0", "fib2"], ["arith1", "fib3"]]
  assert elements(0) == [["arith0", "arith1"], ["fib2", "fib3"]]  # publish order only



def test_a_stage_trains_on_every_family_before_repeating_one(tmp_path):
  # Stage 0 left groups of families a and b unread when the trainer moved to stage 1 (async
  # overshoot); stage 1's workers published a, b, c, d, a, b. Draining the leftovers first, the
  # stage's 2 steps x 2 groups train on a, b (stage 0) then c, d, not a, b again.
  for i, fam in enumerate(["a", "b"]):
    write_group(str(tmp_path), 0, f"{fam}old", [1.0, 0.0], 0, seed=40 + i,
                metadata={"family": fam})
  for i, fam in enumerate(["a", "b", "c", "d", "a", "b"]):
    write_group(str(tmp_path), 1, f"{fam}{i}", [1.0, 0.0], 0, seed=50 + i,
                metadata={"family": fam})

  def stage_one(lookahead, restart_after=0):
    it = iter(StreamDataset(_cfg(tmp_path, family_lookahead=lookahead)))
    it.set_stage(1)
    out = []
    for k in range(3):
      if k == restart_after and k:  # a trainer restart keeps the cycle (checkpointed)
        state = json.loads(json.dumps(it.get_state()))
        it = iter(StreamDataset(_cfg(tmp_path, family_lookahead=lookahead)))
        it.set_state(state)
        it.set_stage(1)
      next(it)
      out.append(sorted(i.split("-")[0][1:] for i in it.last_info["ids"][::2]))
    return out
  assert stage_one(8) == [["aold", "bold"], ["c2", "d3"], ["a0", "b1"]]
  assert stage_one(8, restart_after=2) == stage_one(8)
  # The earlier rule (the element's families only) trains on a and b twice before c and d.
  assert stage_one(0) == [["aold", "bold"], ["a0", "b1"], ["c2", "d3"]]

"""RL loss vs the sampler's logprob convention: with rl.temperature = the sampling temperature the
PPO ratio of freshly sampled tokens is exactly 1; a mismatched temperature shows up at once."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.mesh import make_mesh
from klong_jax.rl import step as rl_step
from klong_jax.train import losses
from klong_jax.train import step as step_lib

B, L, T = 2, 48, 0.7


def _rl(**kw):
  c = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.28, kl_coef=0.01,
                                     kl_estimator="k3", ratio_cap=4.0, normalization="token",
                                     temperature=1.0))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def setup():
  model = create_sharded_model(get_preset("tiny"), make_mesh(ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, expert=1, tensor=1))), seed=0)
  graphdef, params, rest = step_lib.split_model(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 500, (B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  batch = {"tokens": tokens, "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
           "segment_ids": seg, "loss_mask": (np.arange(L)[None] >= 16).astype(np.int32).repeat(
               B, 0), "advantages": np.full((B, L), 0.5, np.float32)}
  logits, _ = model(jnp.asarray(tokens), jnp.asarray(batch["positions"]), jnp.asarray(seg))
  targets, _ = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(seg),
                                    jnp.asarray(batch["loss_mask"]))
  # What the sampler records at temperature T: log softmax(logits / T)[token], at the token.
  tempered = np.asarray(losses.token_logprobs(logits / T, targets))
  behaviour = np.zeros((B, L), np.float32)
  behaviour[:, 1:] = tempered[:, :-1]
  batch["logprobs"] = behaviour
  return graphdef, params, rest, batch


def _metrics(setup, **rl):
  graphdef, params, rest, batch = setup
  _, m = rl_step.rl_loss(graphdef, params, rest, params, {k: jnp.asarray(v) for k, v in
                                                          batch.items()},
                         compute_dtype=jnp.float32, rl=_rl(**rl), lb_coef=0.0, z_coef=0.0)
  return {k: float(v) for k, v in m.items() if jnp.ndim(v) == 0}


def test_matching_temperature_gives_unit_ratio(setup):
  m = _metrics(setup, temperature=T)
  assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
  assert m["clip_frac"] == 0.0 and abs(m["kl"]) < 1e-6


def test_mismatched_temperature_is_visible(setup):
  m = _metrics(setup, temperature=1.0)
  assert abs(m["ratio_mean"] - 1.0) > 1e-2


def test_non_positive_temperature_is_an_error(setup):
  with pytest.raises(ValueError, match="rl.temperature must be > 0"):
    _metrics(setup, temperature=0.0)


def test_rl_step_learns_a_two_armed_bandit():
  """End to end through the jitted RL step, on the shape of decision RL must fix after SFT: a
  policy that picks token A or B after a fixed prompt about 50/50 (imitation first, through the
  same step with advantage 1 on both); then sampled rollouts, reward 1 for A, group-mean
  advantages, PPO + KL. P(A) must climb near 1 (loss, advantage and logprob plumbing agree)."""
  from klong_jax.rl.advantage import group_advantages
  from tests.rl import bandit as bandit_lib

  bandit = bandit_lib.Bandit(_rl(kl_coef=0.001))
  start = bandit.imitate()
  p = np.exp(bandit.policy())
  assert p[bandit_lib.ARM_A] + p[bandit_lib.ARM_B] > 0.9 and 0.25 < start < 0.75, (
      p[bandit_lib.ARM_A], p[bandit_lib.ARM_B])
  rng = np.random.default_rng(0)
  g = bandit_lib.GROUP
  for _ in range(15):  # RL: reward 1 for A
    logp = bandit.policy()
    probs = np.exp(logp) / np.exp(logp).sum()
    ys = rng.choice(len(probs), size=g, p=probs)
    adv, _, _ = group_advantages(list((ys == bandit_lib.ARM_A).astype(float)), ["g"] * g)
    bandit.update(ys, adv, logp)
  end = np.exp(bandit.policy())[bandit_lib.ARM_A]
  assert end > 0.9 and end > start + 0.3, (start, end)


def test_update_plan_partitions_rows_each_epoch_and_balances_loss_rows():
  mask = np.zeros((8, 4), np.int32)
  mask[[0, 1, 2], 1:] = 1  # 3 rows with loss tokens, 5 padding rows
  assert [p.tolist() for p in rl_step.update_plan(mask, mb_rows=8, epochs=1, seed=0,
                                                  step=1)] == [list(range(8))]
  plan = rl_step.update_plan(mask, mb_rows=2, epochs=3, seed=0, step=1)
  assert len(plan) == 6  # ceil(3 loss rows / 2) minibatches per epoch, never an all-pad one
  for e in range(3):
    parts = plan[2 * e:2 * e + 2]
    assert all(len(p) == 2 and len(set(p.tolist())) == 2 for p in parts)
    real = sorted(int(r) for p in parts for r in p if mask[r].any())
    assert real == [0, 1, 2]  # every loss row exactly once per epoch
    assert all(mask[p].any(axis=1).sum() >= 1 for p in parts)
  again = rl_step.update_plan(mask, mb_rows=2, epochs=3, seed=0, step=1)
  assert all(np.array_equal(a, b) for a, b in zip(plan, again, strict=True))  # replayable
  other = rl_step.update_plan(mask, mb_rows=2, epochs=3, seed=0, step=2)
  assert not all(np.array_equal(a, b) for a, b in zip(plan, other, strict=True))


def test_overflowing_element_is_trained_in_evenly_filled_updates():
  # 2 packed batches of 4 rows; the second holds one overflow row: 5 loss rows -> 2 updates
  # of 3 + 2 loss rows (not 4 + a near-empty 1).
  mask = np.zeros((8, 4), np.int32)
  mask[[0, 1, 2, 3, 4], 1:] = 1
  plan = rl_step.update_plan(mask, mb_rows=4, epochs=1, seed=0, step=1)
  assert sorted(int(mask[p].any(axis=1).sum()) for p in plan) == [2, 3]
  with pytest.raises(ValueError, match="multiple of the minibatch rows"):
    rl_step.update_plan(mask[:7], mb_rows=4, epochs=1, seed=0, step=1)


def test_combine_update_metrics():
  ms = [dict(tokens=10.0, loss_tokens=4.0, ratio_mean=1.0, clip_frac=0.0, kl=0.0, loss=1.0,
             kl_max=9.0, logprob_gap_mean=0.01, logprob_gap_max=0.2),
        dict(tokens=10.0, loss_tokens=4.0, ratio_mean=1.2, clip_frac=0.5, kl=0.1, loss=3.0,
             kl_max=0.5, logprob_gap_mean=0.3, logprob_gap_max=2.5)]
  m = rl_step.combine_update_metrics(ms + ms, epochs=2)
  assert m["tokens"] == 40.0 and m["loss_tokens"] == 8.0 and m["loss"] == 2.0
  assert m["kl_max"] == 9.0 and m["logprob_gap_max"] == 2.5
  assert m["ppo/logprob_gap_mean_first"] == 0.01 and m["ppo/logprob_gap_mean_last"] == 0.3
  assert m["ppo/updates"] == 4 and m["ppo/ratio_mean_first"] == 1.0
  assert m["ppo/clip_frac_last"] == 0.5
  assert rl_step.combine_update_metrics(ms[:1]) == ms[0]


def test_routing_replay_in_the_rl_loss(setup):
  """R3: the sampler's own routing replayed keeps ratio 1; other ids are replayed (ratio moves)
  unless rl.routing_replay is off; `routing_replayed` counts the tokens with a record."""
  from flax import nnx
  graphdef, params, rest, batch = setup
  model = nnx.merge(graphdef, params, rest)
  _, aux = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]))
  own = np.asarray(aux["moe_routing"], np.int16)
  m = _metrics((graphdef, params, rest, dict(batch, routing=own)), temperature=T)
  assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["routing_replayed"] == 1.0
  assert m["routing_flip"] == 0.0 and m["logprob_gap_max"] < 1e-5
  other = ((own + 1) % 8).astype(np.int16)
  other[:, :8] = -1  # Not recorded: own top-k.
  moved = _metrics((graphdef, params, rest, dict(batch, routing=other)), temperature=T)
  assert abs(moved["ratio_mean"] - 1.0) > 1e-4
  assert moved["routing_replayed"] == pytest.approx(1 - 8 / L)
  assert moved["routing_flip"] == 1.0  # Every recorded selection is one this router would not make.
  assert moved["logprob_gap_max"] >= moved["logprob_gap_mean"] > 1e-4
  off = _metrics((graphdef, params, rest, dict(batch, routing=other)), temperature=T,
                 routing_replay=False)
  assert off["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and "routing_replayed" not in off
  assert "routing_flip" not in off
  assert rl_step.batch_keys(_rl())[-1] == "routing"
  assert "routing" not in rl_step.batch_keys(_rl(routing_replay=False))

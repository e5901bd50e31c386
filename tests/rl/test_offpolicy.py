"""Off-policy correction for long rollouts: decoupled PPO with truncated / masked importance
weights (rl/losses.py), per-token staleness, and trajectories spanning many policy versions kept
with bounded weights instead of dropped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.data.splitting import SplitConfig
from klong_jax.rl import losses as rl_losses
from klong_jax.rl import step as rl_step
from klong_jax.rl.stream_source import StreamConfig, StreamDataset
from tests.rl import fakes


def _inputs(seed=0, b=3, length=12):
  rng = np.random.default_rng(seed)
  weights = (rng.random((b, length)) > 0.3).astype(np.float32)
  weights[:, -1] = 0.0
  seg = np.ones((b, length), np.int32)
  seg[:, length // 2:] = 2  # two chunks per row
  seg[-1, -3:] = 0  # padding
  weights[seg == 0] = 0.0
  logp = -rng.uniform(0.1, 3.0, (b, length)).astype(np.float32)
  behaviour = (logp + rng.normal(0, 0.8, (b, length))).astype(np.float32)
  prox = (logp + rng.normal(0, 0.3, (b, length))).astype(np.float32)
  adv = rng.normal(0, 1, (b, length)).astype(np.float32)
  return (jnp.asarray(x) for x in (logp, behaviour, prox, adv, weights, seg))


def test_decoupled_equals_plain_ppo_when_the_proximal_policy_is_the_sampler():
  logp, behaviour, _, adv, weights, seg = _inputs()

  def loss(lp, prox):
    return rl_losses.ppo_loss(lp, behaviour, adv, weights, seg, ratio_cap=4.0, prox_logp=prox)[0]

  plain = rl_losses.ppo_loss(logp, behaviour, adv, weights, seg, ratio_cap=4.0)[0]
  np.testing.assert_allclose(loss(logp, behaviour), plain, rtol=1e-6)
  g_plain = jax.grad(lambda lp: rl_losses.ppo_loss(lp, behaviour, adv, weights, seg,
                                                   ratio_cap=4.0)[0])(logp)
  np.testing.assert_allclose(jax.grad(loss)(logp, behaviour), g_plain, rtol=1e-6, atol=1e-7)
  # The proximal policy and the weights are constants: no gradient flows into them.
  _, g_prox = jax.grad(loss, argnums=(0, 1))(logp, behaviour + 0.1)
  assert float(jnp.abs(g_prox).max()) == 0.0


def test_the_clip_is_against_the_proximal_policy_and_the_weight_is_prox_over_behaviour():
  logp, behaviour, prox, adv, weights, seg = _inputs(1)
  _, m = rl_losses.ppo_loss(prox, behaviour, adv, weights, seg, prox_logp=prox, is_cap=1e9)
  assert float(m["ratio_mean"]) == pytest.approx(1.0)  # pi == pi_prox: no clipping at all
  assert float(m["clip_frac"]) == 0.0
  live = np.asarray(weights) > 0
  raw = np.exp(np.asarray(prox) - np.asarray(behaviour))[live]
  want = float((raw * np.asarray(adv)[live]).sum() / live.sum())
  assert float(m["surrogate"]) == pytest.approx(want, rel=1e-5)  # = w * A per token


def test_token_truncation_and_masking_bound_the_weights():
  _, behaviour, prox, _, weights, seg = _inputs(2)
  live = np.asarray(weights) > 0
  raw = np.exp(np.asarray(prox) - np.asarray(behaviour))
  w, m = rl_losses.importance_weights(prox, behaviour, weights, seg, cap=1.5)
  np.testing.assert_allclose(np.asarray(w)[live], np.minimum(raw, 1.5)[live], rtol=1e-5)
  assert float(np.asarray(w)[~live].max()) == 0.0
  assert float(m["is/weight_max"]) <= 1.5
  assert float(m["is/truncated_frac"]) == pytest.approx(float((raw[live] > 1.5).mean()))
  wm, mm = rl_losses.importance_weights(prox, behaviour, weights, seg, mode="mask", cap=1.5)
  keep = (raw <= 1.5) & (raw >= 1 / 1.5)
  np.testing.assert_allclose(np.asarray(wm)[live], np.where(keep, raw, 0.0)[live], rtol=1e-5)
  assert float(mm["is/masked_frac"]) == pytest.approx(float((~keep[live]).mean()))


def test_sequence_level_weight_is_the_chunks_geometric_mean():
  _, behaviour, prox, _, weights, seg = _inputs(3)
  w, _ = rl_losses.importance_weights(prox, behaviour, weights, seg, level="sequence", cap=50.0)
  w, d = np.asarray(w), np.asarray(prox - behaviour)
  wt, s = np.asarray(weights), np.asarray(seg)
  for r in range(s.shape[0]):
    for sid in (1, 2):
      sel = (s[r] == sid) & (wt[r] > 0)
      if sel.any():
        np.testing.assert_allclose(w[r][sel], np.exp(d[r][sel].mean()), rtol=1e-5)


def test_bad_options_name_the_field():
  _, behaviour, prox, _, weights, seg = _inputs()
  with pytest.raises(ValueError, match="rl.is_cap"):
    rl_losses.importance_weights(prox, behaviour, weights, seg, cap=1.0)
  with pytest.raises(ValueError, match="rl.is_level"):
    rl_losses.importance_weights(prox, behaviour, weights, seg, level="row")
  with pytest.raises(ValueError, match="rl.off_policy"):
    rl_step.off_policy({"off_policy": "gae"})


def test_a_trajectory_spanning_versions_0_to_5_is_kept_with_bounded_weights(tmp_path):
  """A long rollout sampled by versions 0..5 (one per turn), trained at version 6: today's pod
  cap (max_staleness=1) drops it; a multi-hour cap keeps it, and its per-token staleness and the
  weights of its very stale tokens stay bounded."""
  traj = fakes.make_trajectory("long-0", "tlong-s0", 1.0, version=0, n=140, seed=3)
  turns = np.cumsum(np.diff(np.concatenate([[0], traj.loss_mask])) == 1)  # policy turn index
  traj.policy_version[:] = np.where(traj.loss_mask > 0, np.minimum(turns - 1, 5), -1)
  assert sorted(set(traj.policy_version[traj.loss_mask > 0].tolist())) == [0, 1, 2, 3, 4, 5]
  other = fakes.make_trajectory("long-1", "tlong-s0", 0.0, version=5, n=140, seed=4)
  from klong_jax.data import shards, storage
  shards.write_shard(storage.join(str(tmp_path), "0", "long.array_record"),
                     [traj.to_bytes(), other.to_bytes()])

  def element(max_staleness):
    cfg = StreamConfig(stream=str(tmp_path), batch_size=8, row_len=160,
                       split=SplitConfig(max_len=160, overlap=8), groups_per_step=1,
                       max_staleness=max_staleness, poll_s=0.01, wait_timeout_s=0.5)
    it = iter(StreamDataset(cfg))
    it.set_policy_version(6)
    return next(it), it

  batch, it = element(max_staleness=1)
  assert it.counters["dropped_stale"] == 1  # today's pod setting: the long rollout is lost
  batch, it = element(max_staleness=8)
  assert it.counters["dropped_stale"] == 0 and sorted(it.last_info["ids"]) == ["long-0", "long-1"]
  stale = rl_step.staleness_metrics(batch["policy_version"], batch["loss_mask"], 6)
  assert stale["stale/max"] == 6 and stale["stale/share_0"] == 0.0
  assert stale["stale/share_1"] > 0 and stale["stale/share_4-7"] > 0
  # Very stale behaviour logprobs (the policy moved a lot since version 0): bounded weights.
  from klong_jax.train import losses
  mask = jnp.asarray(batch["loss_mask"])
  seg = jnp.asarray(batch["segment_ids"])
  _, weights = losses.shift_targets(jnp.asarray(batch["tokens"]), seg, mask)
  behaviour = losses.shift_aligned(jnp.asarray(batch["logprobs"]))
  prox = behaviour + 5.0 * (losses.shift_aligned(jnp.asarray(batch["policy_version"])) < 3)
  w, m = rl_losses.importance_weights(prox, behaviour, weights, seg, cap=2.0)
  assert float(m["is/raw_max"]) > 100 and float(m["is/weight_max"]) == 2.0
  assert 0 < float(m["is/truncated_frac"]) < 1


@pytest.mark.slow
def test_with_forced_staleness_the_decoupled_loss_learns_like_on_policy_and_ppo_lags():
  """The two-armed bandit of tests/rl/test_rl_step.py, but every batch is sampled by the policy
  8 updates old (its logprobs are the behaviour). Today's loss (ratio vs the stale sampler, then
  clipped) learns more slowly than on-policy; decoupled PPO (clip vs the proximal policy,
  truncated pi_prox/mu weights) follows the on-policy curve. Measured (P(arm A) after each of 5
  RL steps): on-policy .570 .702 .835 .924 .971; decoupled lag 8 .570 .702 .835 .926 .972;
  PPO lag 8 .570 .702 .800 .868 .912 (the first two batches of every arm are sampled by the
  same starting policy, so they agree there)."""
  import collections

  import ml_collections

  from klong_jax.rl.advantage import group_advantages
  from tests.rl import bandit as bandit_lib

  def run(mode, lag, steps=5):
    bandit = bandit_lib.Bandit(ml_collections.ConfigDict(dict(
        clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3", ratio_cap=4.0,
        normalization="token", temperature=1.0, off_policy=mode, is_cap=2.0, is_level="token",
        is_mode="truncate")))
    bandit.imitate()
    rng = np.random.default_rng(0)
    old = collections.deque([bandit.policy()] * (lag + 1), maxlen=lag + 1)
    curve, g = [], bandit_lib.GROUP
    for _ in range(steps):
      logp = old[0]  # the policy `lag` updates ago samples this batch
      probs = np.exp(logp) / np.exp(logp).sum()
      ys = rng.choice(len(probs), size=g, p=probs)
      adv, _, _ = group_advantages(list((ys == bandit_lib.ARM_A).astype(float)), ["g"] * g)
      bandit.update(ys, adv, logp)
      old.append(bandit.policy())
      curve.append(float(np.exp(old[-1])[bandit_lib.ARM_A]))
    return np.asarray(curve)

  on_policy = run("none", 0)
  decoupled = run("decoupled", 8)
  ppo = run("none", 8)
  assert np.abs(decoupled - on_policy).max() < 0.02, (decoupled, on_policy)
  assert (decoupled[2:] > ppo[2:] + 0.03).all(), (decoupled, ppo)
  assert decoupled[-1] > 0.95

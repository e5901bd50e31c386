"""A fixed number of optimizer updates per RL step, minibatches formed by trajectories (issue #31):
dealing, packing, the loss denominator of a split update, accumulation vs one big update, and the
update count / LR schedule count whatever the chunks per rollout."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from klong_jax.data.splitting import SplitConfig
from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES, batch_sharding
from klong_jax.rl import losses as rl_losses
from klong_jax.rl import minibatch
from klong_jax.rl import step as rl_step
from klong_jax.rl import train as rl_train
from klong_jax.rl.stream_source import StreamConfig, StreamDataset
from klong_jax.train import losses, optim
from klong_jax.train import step as step_lib
from tests.rl.fakes import write_group

ROW = 64


def test_deal_puts_every_trajectory_in_one_minibatch_balanced_and_seeded():
  loss = [40, 400, 40, 120, 80, 40, 200, 10]
  out = minibatch.deal(loss, 3, minibatch.element_rng(0, "k"))
  assert sorted(i for m in out for i in m) == list(range(8))
  load = [sum(loss[i] for i in m) for m in out]
  assert max(load) - min(load) <= max(loss[i] for m in out for i in m)  # LPT bound
  assert out == minibatch.deal(loss, 3, minibatch.element_rng(0, "k"))
  assert minibatch.deal([1, 1], 4, minibatch.element_rng(0, "k")).count([]) == 2


def test_loss_denominator_matches_the_loss_on_one_batch():
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 4, (4, 32)), axis=1)
  mask = rng.integers(0, 2, (4, 32))
  _, w = losses.shift_targets(jnp.zeros((4, 32), jnp.int32), jnp.asarray(seg), jnp.asarray(mask))
  assert minibatch.loss_denominator(seg, mask, "token") == float(w.sum())
  per_token = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
  for norm in ("token", "sequence"):
    own = rl_losses._normalize(per_token, w, jnp.asarray(seg), norm)
    given = rl_losses._normalize(per_token, w, jnp.asarray(seg), norm,
                                 jnp.float32(minibatch.loss_denominator(seg, mask, norm)))
    np.testing.assert_allclose(float(own), float(given), rtol=1e-6)


def _stream(root, n_tokens, updates=2, seed=0):
  # Advantages +-0.5625/0.0625/-0.1875 and 0.4/-0.3/0.1/-0.2: each rollout's tokens are tagged.
  for g, rewards in enumerate(([1.0, 0.0, 0.5, 0.25], [0.9, 0.2, 0.6, 0.3])):
    write_group(str(root), 0, f"g{g}", rewards, 0, n=n_tokens, seed=seed + 10 * g)
  return iter(StreamDataset(StreamConfig(
      stream=str(root), batch_size=16, row_len=ROW, split=SplitConfig(max_len=ROW, overlap=8),
      groups_per_step=2, poll_s=0.01, wait_timeout_s=1.0, updates_per_step=updates,
      micro_rows=8)))


def _element(it):
  return rl_train._next_element(it)[0]


def test_stream_packs_each_minibatch_apart_and_trains_every_token_once(tmp_path):
  b = _element(_stream(tmp_path / "a", 400))
  ref = _element(_stream(tmp_path / "b", 400, updates=0))
  assert int(b["loss_mask"].sum()) == int(ref["loss_mask"].sum()) == 8 * 190
  mb = b["minibatch"]
  assert set(mb.tolist()) == {-1, 0, 1} or set(mb.tolist()) == {0, 1}
  for j in (0, 1):
    assert (mb == j).sum() % 8 == 0  # whole micro-batches
  # Every rollout (tagged by its advantage) lies in one minibatch: all its chunks' rows share the
  # index; padding rows (-1) carry no loss token.
  live = b["loss_mask"] > 0
  tags = np.round(b["advantages"], 4)
  where = {}
  for row, col in zip(*np.nonzero(live), strict=True):
    where.setdefault(float(tags[row, col]), set()).add(int(mb[row]))
  assert len(where) == 8 and all(len(v) == 1 for v in where.values())
  assert {j for v in where.values() for j in v} == {0, 1}
  assert not live[mb < 0].any()


def _trainer(rl_kw):
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1)))
  small = dataclasses.replace(get_preset("tiny"), num_layers=2)  # 1 dense + 1 MoE: compiles faster
  graphdef, params, rest = step_lib.split_model(create_sharded_model(small, mesh, seed=3))
  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=1, total_steps=100, clip_norm=1e9, weight_decay=0.0, b1=0.9,
      b2=0.95, eps=1e-8, final_lr_ratio=1.0, lb_coef=0.0, z_coef=0.0, expert_bias_rate=0.0,
      compute_dtype="float32", grad_accum=1))
  rl = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                                      kl_estimator="k3", ratio_cap=4.0, normalization="token",
                                      temperature=1.0, routing_replay=False, **rl_kw))
  tx = optim.make_optimizer(ocfg)
  sh = step_lib.state_shardings(params, rest, tx, mesh, LOGICAL_RULES)
  bsh = batch_sharding(mesh, LOGICAL_RULES)
  parts = (graphdef, tx, ocfg, rl, sh, bsh, LOGICAL_RULES)

  def fresh():
    p, r = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest)
    state = step_lib.init_state(p, r, tx, sh)
    return state, rl_step.copy_params(state.params, sh.params)
  return parts, fresh, bsh, rl_step.make_rl_accum_step(*parts)


@pytest.fixture(scope="module")
def trainer():
  return _trainer({"updates_per_step": 2, "ppo_epochs": 2})


def _counts(opt_state):
  """The step counts in the optimizer state (Adam's and the LR schedule's)."""
  return {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")}


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_update_on_the_whole_minibatch(trainer, tmp_path):
  parts, fresh, _, acc = trainer
  b = _element(_stream(tmp_path, 400))
  rows = np.flatnonzero(b["minibatch"] == 0)[:16]
  assert rows.size == 16
  keys = rl_step.batch_keys(parts[3])
  whole = {k: b[k][rows] for k in keys}
  den = minibatch.loss_denominator(whole["segment_ids"], whole["loss_mask"], "token")
  # Reference: the plain RL step on all 16 rows (one batch, its own token mean).
  state, ref = fresh()
  step = rl_step.make_rl_step(*parts)
  ref_state, ref_m = step(state, ref, whole)
  # New: two 8-row micro-batches, each divided by the 16 rows' denominator, one update.
  state, ref = fresh()
  halves = [{k: v[:8] for k, v in whole.items()}, {k: v[8:] for k, v in whole.items()}]
  g0, m0 = acc.grad(state, ref, halves[0], den, 0.5)
  g1, m1 = acc.grad(state, ref, halves[1], den, 0.5)
  new_state, gnorm = acc.apply(state, acc.add(g0, g1), (m0["moe_expert_load"] +
                                                        m1["moe_expert_load"]) / 2)
  np.testing.assert_allclose(float(gnorm), float(ref_m["grad_norm"]), rtol=1e-4)
  np.testing.assert_allclose(float(m0["loss"] + m1["loss"]), float(ref_m["loss"]), rtol=1e-5)
  for a, r in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_state.params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-4, atol=2e-6)
  assert int(new_state.step) == int(ref_state.step) == 1


@pytest.mark.slow
def test_exactly_n_updates_per_step_whatever_the_chunks_per_rollout(trainer, tmp_path):
  parts, fresh, bsh, acc = trainer
  config = ml_collections.ConfigDict(dict(seed=0, rl=parts[3].to_dict()))
  state, ref = fresh()
  micro = []
  for k, n_tokens in enumerate((100, 400)):  # 1-2 vs 8 chunks per rollout
    b = _element(_stream(tmp_path / str(k), n_tokens, seed=k))
    before = int(state.step)
    state, ms, skipped = rl_train.train_by_trajectories(acc, state, ref, b, config, 8, k + 1, bsh)
    assert int(state.step) - before == len(ms) == 2 * 2 and skipped == 0  # epochs x N
    micro.append(sum(m["micro_batches"] for m in ms))
    assert _counts(state.opt_state) == {int(state.step)}  # the LR schedule's count = updates
  assert micro[1] > micro[0]  # longer rollouts: more micro-batches, not more updates
  assert rl_train.updates_per_element(parts[3]) == 4
  legacy = ml_collections.ConfigDict(dict(ppo_epochs=2, minibatches=3))
  assert rl_train.updates_per_element(legacy) == 6

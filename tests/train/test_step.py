"""Train step: sharded (8 fake devices, data x fsdp) == unsharded; expert bias; bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES
from klong_jax.train import step as step_lib
from tests.train.step_testlib import assert_runs_match, tiny_train_state

B, L = 8, 64


def _optim_cfg(**kw):
  c = sft_tiny.get_config().optim  # Every field the trainer reads (defaults live in configs).
  c.update(dict(lr=1e-2, warmup_steps=1, total_steps=10, clip_norm=1.0, weight_decay=0.01,
                lb_coef=1e-2, z_coef=1e-3, expert_bias_rate=1e-2, compute_dtype="float32"))
  c.update(kw)
  return c


def _batch():
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, 40:] = 2           # two packed chunks per row
  seg[::2, 56:] = 0         # padding on half the rows
  pos = np.concatenate([np.arange(40), np.arange(L - 40)])
  return {"tokens": rng.integers(0, 512, (B, L)).astype(np.int32),
          "positions": np.tile(pos, (B, 1)).astype(np.int32) * (seg > 0),
          "segment_ids": seg, "loss_mask": (rng.random((B, L)) < 0.6).astype(np.int32) * (seg > 0)}


def _train(mesh, ocfg, steps=3):
  """Runs `steps` identical-batch steps; returns (host params, host rest, metrics list)."""
  graphdef, tx, sh, state, bsh = tiny_train_state(mesh, ocfg)
  fn = step_lib.make_sft_step(graphdef, tx, ocfg, sh, bsh, LOGICAL_RULES)
  out = []
  for _ in range(steps):
    state, m = fn(state, {k: jax.device_put(v, bsh) for k, v in _batch().items()})
    out.append({k: float(v) for k, v in m.items()})
  return jax.device_get(state.params), jax.device_get(state.rest), out, state


@pytest.fixture(scope="module")
def unsharded():
  return _train(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), _optim_cfg())


def test_sharded_step_equals_unsharded(unsharded):
  mesh = make_mesh({"data": 2, "fsdp": 4})
  p1, r1, m1, _ = unsharded
  p8, r8, m8, state = _train(mesh, _optim_cfg())
  # Params really are sharded over fsdp on the 8-device run.
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  assert any("fsdp" in s for s in specs)
  assert_runs_match(m1, m8, p1, p8)  # Losses/grad norms to ~1e-7, params to atol 1e-4.
  for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r8), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_learns_and_updates_expert_bias(unsharded):
  _, rest, metrics, _ = unsharded
  assert metrics[2]["loss"] < metrics[0]["loss"]  # same batch again (step 0 has lr 0): drops
  assert metrics[0]["loss_tokens"] > 0
  assert metrics[0]["tokens"] == float((_batch()["segment_ids"] > 0).sum())
  bias = [v for v in jax.tree.leaves(rest) if np.ndim(v) == 2]
  assert bias and np.abs(bias[0]).max() > 0  # aux-loss-free balancing moved the router bias
  # Each step moves each bias by exactly +-rate (or 0): so multiples of the rate.
  np.testing.assert_allclose(np.round(bias[0] / 1e-2), bias[0] / 1e-2, atol=1e-4)


def test_bf16_compute_keeps_fp32_masters(unsharded):
  params, _, m32, _ = unsharded
  p16, _, m16, _ = _train(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]),
                          _optim_cfg(compute_dtype="bfloat16"), steps=1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16) if x.dtype.kind == "f")
  assert abs(m16[0]["ce"] - m32[0]["ce"]) < 0.05  # same loss up to bf16 rounding
  assert m16[0]["ce"] != m32[0]["ce"]              # ...but really computed in bf16

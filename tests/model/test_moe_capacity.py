"""Token-dropping (capacity) MoE path: equals dense when nothing drops, a numpy count otherwise."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model import moe_dispatch
from klong_jax.model.config import ConfigError, get_preset
from klong_jax.model.moe import MoE, routed_experts
from klong_jax.model.transformer import Transformer
from klong_jax.parallel.mesh import make_mesh
from tests.model.moe_testlib import E, K, N, expert_operands


def _inputs(seed=0):
  """Skewed routing (experts 0/1 favoured) so a small capacity really drops copies."""
  keys = jax.random.split(jax.random.key(seed), 6)
  probs = jnp.array([4, 3, 1, 1, 1, 1, 0.5, 0.5]) / 12.0
  idx = jax.vmap(lambda k: jax.random.choice(k, E, (K,), replace=False, p=probs))(
      jax.random.split(keys[1], N))
  x, w, wg, wu, wd = expert_operands(keys)
  return x, idx.astype(jnp.int32), w, wg, wu, wd


def _numpy_capacity(x, idx, w, wg, wu, wd, capacity):
  """Loop reference: choice-major priority, an expert keeps its first `capacity` copies."""
  x, idx, w, wg, wu, wd = map(np.asarray, (x, idx, w, wg, wu, wd))
  out = np.zeros_like(x)
  filled = np.zeros(wg.shape[0], int)
  dropped = 0
  for j in range(idx.shape[1]):
    for n in range(x.shape[0]):
      e = idx[n, j]
      if filled[e] >= capacity:
        dropped += 1
        continue
      filled[e] += 1
      g, u = x[n] @ wg[e], x[n] @ wu[e]
      out[n] += w[n, j] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
  return out, dropped


def _capacity_fn(capacity):
  return jax.jit(lambda *a: moe_dispatch.capacity_ffn(*a, capacity=capacity))


def test_expert_capacity_formula():
  assert moe_dispatch.expert_capacity(48, 2, 8, 1.0) == 12
  assert moe_dispatch.expert_capacity(48, 2, 8, 1.25) == 15
  assert moe_dispatch.expert_capacity(10, 3, 8, 1.0) == math.ceil(30 / 8)
  assert moe_dispatch.expert_capacity(1, 1, 128, 0.5) == 1  # Never zero slots.


def test_no_drop_equals_dense_outputs_and_grads():
  args = _inputs()
  capacity = N  # Every copy fits (an expert takes at most one copy per token).
  y, dropped = _capacity_fn(capacity)(*args)
  assert float(dropped) == 0.0
  np.testing.assert_allclose(y, jax.jit(moe_dispatch.dense_reference)(*args), atol=1e-5)

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grads = jax.jit(jax.grad(loss(lambda *a: _capacity_fn(capacity)(*a)[0]),
                           argnums=(0, 2, 3, 4, 5)))(*args)
  ref = jax.jit(jax.grad(loss(moe_dispatch.dense_reference), argnums=(0, 2, 3, 4, 5)))(*args)
  for g, r in zip(grads, ref, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_small_capacity_drops_match_numpy(factor):
  args = _inputs()
  capacity = moe_dispatch.expert_capacity(N, K, E, factor)
  want, want_dropped = _numpy_capacity(*args, capacity)
  assert want_dropped > 0  # The skewed routing must overflow experts 0/1.
  y, dropped = _capacity_fn(capacity)(*args)
  assert int(dropped) == want_dropped
  np.testing.assert_allclose(y, want, atol=1e-5)
  # Dropped copies get no gradient: zeroing their weights changes neither output nor grads.
  _, _, kept = moe_dispatch.capacity_positions(args[1], E, capacity)
  masked = (args[0], args[1], jnp.where(kept, args[2], 0.0), *args[3:])
  np.testing.assert_allclose(jax.jit(moe_dispatch.dense_reference)(*masked), y, atol=1e-5)
  gw = jax.grad(lambda w: jnp.sum(_capacity_fn(capacity)(args[0], args[1], w, *args[3:])[0]))(
      args[2])
  assert np.all(np.asarray(gw)[~np.asarray(kept)] == 0)


def test_local_slice_counts_only_its_experts():
  """offset/E_local: copies for other experts are neither computed nor counted as dropped."""
  x, idx, w, wg, wu, wd = _inputs()
  capacity = 4
  full, full_dropped = _capacity_fn(capacity)(x, idx, w, wg, wu, wd)
  parts = [_capacity_fn(capacity)(x, idx, w, wg[o:o + 4], wu[o:o + 4], wd[o:o + 4], o)
           for o in (0, 4)]
  np.testing.assert_allclose(parts[0][0] + parts[1][0], full, atol=1e-5)
  assert float(parts[0][1] + parts[1][1]) == float(full_dropped) > 0


def _tiny(**changes):
  return get_preset("tiny").replace(**{"moe_impl": "capacity", **changes})


def test_moe_module_drop_rate():
  x = jax.random.normal(jax.random.key(3), (2, 8, 64))
  run = nnx.jit(lambda m, x: m(x))
  dense, dense_aux = run(MoE(_tiny(moe_impl="dense"), rngs=nnx.Rngs(0)), x)
  big, big_aux = run(MoE(_tiny(capacity_factor=8.0), rngs=nnx.Rngs(0)), x)  # C = N.
  np.testing.assert_allclose(big, dense, atol=1e-6)
  assert float(big_aux["moe_drop_rate"]) == 0.0 == float(dense_aux["moe_drop_rate"])
  layer = MoE(_tiny(capacity_factor=0.5), rngs=nnx.Rngs(0))
  _, aux = run(layer, x)
  idx, _, _ = layer.route(x.reshape(16, 64))
  capacity = moe_dispatch.expert_capacity(16, 2, 8, 0.5)
  counts = np.zeros(8, int)
  dropped = 0
  for e in np.asarray(idx).T.reshape(-1):  # Choice-major, as the kernel ranks copies.
    dropped += counts[e] >= capacity
    counts[e] += 1
  assert aux["moe_drop_rate"].shape == ()
  np.testing.assert_allclose(aux["moe_drop_rate"], dropped / idx.size, rtol=1e-6)
  assert dropped > 0


def test_transformer_aux_reports_mean_drop_rate():
  cfg = _tiny(capacity_factor=0.5, num_layers=3)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  _, aux = nnx.jit(lambda m, t, p: m(t, p))(model, tokens, positions)
  assert aux["moe_drop_rate"].shape == () and 0 < float(aux["moe_drop_rate"]) < 1
  ref = Transformer(dataclasses.replace(cfg, moe_impl="dense"), rngs=nnx.Rngs(0))
  _, ref_aux = nnx.jit(lambda m, t, p: m(t, p))(ref, tokens, positions)
  assert float(ref_aux["moe_drop_rate"]) == 0.0


@pytest.mark.parametrize("sizes", [{"expert": 4}, {"data": 2, "expert": 2}, {"expert": 2,
                                                                            "tensor": 2}])
def test_expert_parallel_matches_per_group_reference(sizes):
  """Under shard_map: capacity per token group (tokens a device sees after the all-gather)."""
  x, idx, w, wg, wu, wd = _inputs()
  mesh = make_mesh(sizes, devices=jax.devices()[:math.prod(sizes.values())])
  fn = jax.jit(lambda *a: routed_experts(*a, impl="capacity", capacity_factor=0.75))
  with jax.set_mesh(mesh):
    y, rate = fn(x, idx, w, wg, wu, wd)
  groups = sizes.get("data", 1)
  size = N // groups
  capacity = moe_dispatch.expert_capacity(size, K, E, 0.75)
  want, dropped = [], 0
  for g in range(groups):
    s = slice(g * size, (g + 1) * size)
    out, count = _numpy_capacity(x[s], idx[s], w[s], wg, wu, wd, capacity)
    want.append(out)
    dropped += count
  assert dropped > 0
  np.testing.assert_allclose(y, np.concatenate(want), atol=1e-5)
  np.testing.assert_allclose(rate, dropped / idx.size, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1.0", None])
def test_capacity_factor_validation(bad):
  with pytest.raises(ConfigError, match="capacity_factor"):
    get_preset("tiny").replace(capacity_factor=bad)


def test_capacity_impl_accepted():
  cfg = get_preset("tiny").replace(moe_impl="capacity", capacity_factor=1)
  assert cfg.moe_impl == "capacity"

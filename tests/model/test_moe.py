"""Router and dropless expert paths: every path equals the dense one-hot reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model import moe_dispatch, moe_router
from klong_jax.model.config import get_preset
from klong_jax.model.moe import MoE
from tests.model.moe_testlib import E, K, N, expert_operands


def _inputs(seed=0, skip=(5, 6)):
  """Tokens routed only to experts not in `skip` (so those receive zero tokens)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  allowed = jnp.array([e for e in range(E) if e not in skip])
  choice = jax.vmap(lambda k: jax.random.choice(k, allowed, (K,), replace=False))(
      jax.random.split(keys[1], N))
  x, w, wg, wu, wd = expert_operands(keys)
  return x, choice.astype(jnp.int32), w, wg, wu, wd


def _loop_reference(x, idx, w, wg, wu, wd):
  """Per-token, per-choice numpy loop: the definition of the routed-expert output."""
  x, idx, w, wg, wu, wd = map(np.asarray, (x, idx, w, wg, wu, wd))
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[n, j]
      g, u = x[n] @ wg[e], x[n] @ wu[e]
      out[n] += w[n, j] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
  return out


def test_dense_reference_matches_loop():
  args = _inputs()
  np.testing.assert_allclose(jax.jit(moe_dispatch.dense_reference)(*args), _loop_reference(*args),
                             atol=1e-5)


@pytest.mark.parametrize("impl,block", [("ragged", 0), ("gmm", 0), ("blocked", 1), ("blocked", 4),
                                        ("blocked", 64)])
def test_dropless_paths_equal_dense(impl, block):
  args = _inputs()
  assert int(jnp.sum(jnp.isin(args[1], jnp.array([5, 6])))) == 0  # Two experts get no tokens.
  fn = jax.jit(lambda *a: moe_dispatch.local_experts(impl, *a, block_size=block or 64))
  np.testing.assert_allclose(fn(*args), jax.jit(moe_dispatch.dense_reference)(*args), atol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grads = jax.jit(jax.grad(loss(fn), argnums=(0, 2, 3, 4, 5)))(*args)
  ref_grads = jax.jit(jax.grad(loss(moe_dispatch.dense_reference), argnums=(0, 2, 3, 4, 5)))(*args)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("impl", ["dense", "ragged", "blocked"])
def test_local_expert_slice(impl):
  """With offset, only copies routed to experts [offset, offset+E_local) contribute."""
  x, idx, w, wg, wu, wd = _inputs(seed=1, skip=())
  fn = jax.jit(moe_dispatch.local_experts, static_argnums=(0, 8))
  halves = [fn(impl, x, idx, w, wg[o:o + E // 2], wu[o:o + E // 2],
                                       wd[o:o + E // 2], o, 4) for o in (0, E // 2)]
  np.testing.assert_allclose(halves[0] + halves[1], _loop_reference(x, idx, w, wg, wu, wd),
                             atol=1e-5)


def test_effective_block_shrinks_for_few_rows():
  assert moe_dispatch.effective_block(16384, 64, 64) == 64
  assert moe_dispatch.effective_block(64, 128, 64) == 1
  assert moe_dispatch.effective_block(96, 8, 64) == 8


def test_router_bias_selects_but_does_not_weight():
  scores = jnp.array([[0.9, 0.8, 0.1, 0.2]])
  bias = jnp.array([0.0, 0.0, 1.0, 0.0])
  select = jax.jit(moe_router.select_experts, static_argnums=(2, 3, 4))
  idx, w = select(scores, bias, 2, False, 2.0)
  assert sorted(idx[0].tolist()) == [0, 2]
  np.testing.assert_allclose(sorted(w[0].tolist()), [0.2, 1.8], rtol=1e-6)
  _, wn = select(scores, None, 2, True, 1.0)
  np.testing.assert_allclose(jnp.sum(wn), 1.0, rtol=1e-6)


@jax.jit
def _aux_terms(logits, balanced, skewed):
  scores = moe_router.router_scores(logits, "softmax")
  load = moe_router.expert_load(skewed, 4)
  return (moe_router.load_balancing_loss(scores, balanced), load,
          moe_router.router_z_loss(logits), moe_router.update_expert_bias(jnp.zeros(4), load, 0.1))


def test_aux_losses():
  logits = jnp.zeros((16, 4))
  balanced = jnp.arange(32).reshape(16, 2) % 4
  lb, load, z, bias = _aux_terms(logits, balanced, jnp.zeros((16, 2), jnp.int32))
  np.testing.assert_allclose(lb, 1.0, rtol=1e-6)
  np.testing.assert_allclose(load, [1.0, 0, 0, 0])
  np.testing.assert_allclose(z, np.log(4.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(bias, [-0.1, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_moe_module_impls_agree(score):
  base = dataclasses.replace(get_preset("tiny"), router_score=score, router_bias=score == "sigmoid",
                             routed_scaling_factor=2.5)
  x = jax.random.normal(jax.random.key(3), (2, 8, base.hidden_size))
  outs = {}
  for impl in ("dense", "ragged", "blocked"):
    layer = MoE(dataclasses.replace(base, moe_impl=impl, moe_block_size=4), rngs=nnx.Rngs(0))
    outs[impl], aux = nnx.jit(lambda m, x: m(x))(layer, x)
    assert aux["moe_expert_load"].shape == (base.num_experts,)
  np.testing.assert_allclose(outs["ragged"], outs["dense"], atol=1e-6)
  np.testing.assert_allclose(outs["blocked"], outs["dense"], atol=1e-6)

"""Optimizer recipe: schedule shape, clipping, weight-decay mask, accumulation, bf16 compute."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from klong_jax.train import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=4, total_steps=20, final_lr_ratio=0.1,
                                     clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                     grad_accum=1))
  c.update(kw)
  return c


def test_schedule_warmup_then_cosine_to_floor():
  s = optim.make_schedule(_cfg())
  np.testing.assert_allclose([s(0), s(2), s(4), s(12), s(20)],
                             [0.0, 5e-3, 1e-2, 1e-3 + 9e-3 * 0.5, 1e-3], rtol=1e-5)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(_cfg(total_steps=4))


def test_clipping_scales_gradients_before_adam():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  grads = {"w": jnp.full((2, 2), 40.0), "b": jnp.array([60.0, 0.0])}  # global norm 100
  tx = optim.make_optimizer(_cfg())
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu"))
          if hasattr(s, "nu")][0]
  # nu = (1 - b2) * clipped_g**2 with clipped = g / 100.
  np.testing.assert_allclose(adam.nu["w"], 0.05 * 0.4 ** 2, rtol=1e-5)
  np.testing.assert_allclose(adam.nu["b"], [0.05 * 0.6 ** 2, 0.0], rtol=1e-5)


def test_weight_decay_skips_vectors():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(_cfg(clip_norm=0.0))
  state = tx.init(params)
  for _ in range(3):  # past step 0, where the warmup learning rate is 0
    upd, state = tx.update(zeros, state, params)
  assert float(jnp.abs(upd["w"]).max()) > 0
  assert float(jnp.abs(upd["b"]).max()) == 0


def test_grad_accumulation_equals_mean_gradient_step():
  params = {"w": jnp.arange(4.0).reshape(2, 2)}
  g1, g2 = {"w": jnp.full((2, 2), 0.2)}, {"w": jnp.array([[0.1, -0.3], [0.5, 0.0]])}
  acc = optim.make_optimizer(_cfg(grad_accum=2, warmup_steps=1))
  one = optim.make_optimizer(_cfg(grad_accum=1, warmup_steps=1))
  sa, so = acc.init(params), one.init(params)
  pa, po = params, params
  for _ in range(2):  # two optimizer updates (the first has lr 0)
    u, sa = acc.update(g1, sa, pa)
    np.testing.assert_array_equal(u["w"], 0.0)  # mid-accumulation: no change
    u, sa = acc.update(g2, sa, pa)
    pa = optax.apply_updates(pa, u)
    u, so = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), so, po)
    po = optax.apply_updates(po, u)
  np.testing.assert_allclose(pa["w"], po["w"], rtol=1e-6)
  assert not np.allclose(pa["w"], params["w"])
  with pytest.raises(ValueError, match="grad_accum"):
    optim.make_optimizer(_cfg(grad_accum=0))


def test_bf16_compute_keeps_fp32_master_gradients():
  params = {"w": jnp.full((3,), 1.0 / 3.0), "n": jnp.arange(3)}
  f = lambda p: (optim.cast_for_compute(p, "bfloat16")["w"].astype(jnp.float32) ** 2).sum()
  cast = optim.cast_for_compute(params, "bfloat16")
  assert cast["w"].dtype == jnp.bfloat16 and cast["n"].dtype == params["n"].dtype
  g = jax.grad(f, allow_int=True)(params)
  assert g["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown dtype"):
    optim.resolve_dtype("fp8")

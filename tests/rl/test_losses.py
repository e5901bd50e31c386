"""Hand-computed checks of the RL loss: PPO clipping, dual clip, KL estimators, clamp, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.rl import losses

LOG = np.log


def _ppo(logp, adv, **kw):
  n = len(logp)
  f = lambda lp: losses.ppo_loss(lp[None], jnp.zeros((1, n)), jnp.asarray(adv)[None],
                                 jnp.ones((1, n)), jnp.ones((1, n), jnp.int32), **kw)[0]
  lp = jnp.asarray(logp, jnp.float32)
  return float(f(lp)), np.asarray(jax.grad(f)(lp))


@pytest.mark.parametrize("ratio,adv,loss,grad", [
    (1.5, 1.0, -1.2, 0.0),    # A > 0, ratio above 1 + eps: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5),   # A > 0, ratio below: unclipped, d/dlogp = -r A
    (0.5, -1.0, 0.8, 0.0),    # A < 0, ratio below 1 - eps: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5),    # A < 0, ratio above: unclipped (pessimistic branch)
    (1.1, 2.0, -2.2, -2.2),   # inside the trust region
])
def test_ppo_clipping_both_sides(ratio, adv, loss, grad):
  got_loss, got_grad = _ppo([LOG(ratio)], [adv], clip_low=0.2, clip_high=0.2)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(got_grad, [grad], rtol=1e-6, atol=1e-7)


def test_ratio_cap_is_dual_clip_for_negative_advantage():
  loss, grad = _ppo([LOG(3.0)], [-1.0], ratio_cap=2.0)
  np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
  np.testing.assert_allclose(grad, [0.0])
  loss, grad = _ppo([LOG(1.5)], [-1.0], ratio_cap=2.0)  # below the cap: unchanged
  np.testing.assert_allclose((loss, grad[0]), (1.5, 1.5), rtol=1e-6)
  with pytest.raises(ValueError, match="ratio_cap"):
    _ppo([0.0], [1.0], ratio_cap=1.1)


@pytest.mark.parametrize("est,d,value,grad", [
    ("k1", LOG(2.0), LOG(2.0), 1.0),
    ("k2", LOG(2.0), 0.5 * LOG(2.0) ** 2, LOG(2.0)),
    ("k3", LOG(2.0), 0.5 - 1 + LOG(2.0), 0.5),       # logp above ref: penalty pushes it down
    ("k3", -LOG(2.0), 2.0 - 1 - LOG(2.0), -1.0),     # logp below ref: pushes it up
])
def test_kl_estimators_value_sign_and_gradient(est, d, value, grad):
  f = lambda lp: losses.kl_penalty(lp, jnp.float32(0.0), est)
  np.testing.assert_allclose(f(jnp.float32(d)), value, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(jnp.float32(d)), grad, rtol=1e-5)


def test_kl_term_added_with_coefficient_and_needs_ref():
  lp = jnp.array([[LOG(2.0)]], jnp.float32)
  kw = dict(clip_low=0.2, clip_high=0.2)
  args = (lp, lp, jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1), jnp.int32))
  loss, m = losses.ppo_loss(*args, ref_logp=jnp.zeros((1, 1)), kl_coef=0.1, **kw)
  np.testing.assert_allclose(loss, 0.1 * (0.5 - 1 + LOG(2.0)), rtol=1e-5)
  np.testing.assert_allclose(m["kl"], 0.5 - 1 + LOG(2.0), rtol=1e-5)
  with pytest.raises(ValueError, match="ref_logp"):
    losses.ppo_loss(*args, kl_coef=0.1, **kw)


def test_kl_clamp_bounds_an_exploded_token_and_leaves_the_rest():
  lp = jnp.array([[-20.0, -1.0]])   # token 0: the policy made it e^-20 times less likely
  ref = jnp.array([[0.0, -1.5]])
  w = jnp.ones((1, 2))
  args = (jnp.zeros((1, 2)), w, jnp.ones((1, 2), jnp.int32))
  f = lambda lp, c: losses.ppo_loss(lp, lp, *args, ref_logp=ref, kl_coef=1.0, kl_clamp=c)
  k3 = lambda d: np.exp(-d) - 1 + d
  loss, m = f(lp, 10.0)
  np.testing.assert_allclose(loss, (10.0 + k3(0.5)) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["kl_max"], k3(-20.0), rtol=1e-4)  # reported before the clamp
  g = jax.grad(lambda lp: f(lp, 10.0)[0])(lp)
  assert float(g[0, 0]) == 0.0  # beyond the bound: no gradient, as verl's clamp
  np.testing.assert_allclose(g[0, 1], (1 - np.exp(-0.5)) / 2, rtol=1e-5)
  unclamped, _ = f(lp, None)
  np.testing.assert_allclose(unclamped, (k3(-20.0) + k3(0.5)) / 2, rtol=1e-4)


def test_ppo_masking_ignores_garbage_and_gives_zero_gradient():
  logp = jnp.array([[-1.0, -50.0, -0.5]])
  behaviour = jnp.array([[-1.2, 0.0, -0.5]])  # masked middle token: ratio would be e^-50
  ref = jnp.array([[-1.0, 80.0, -0.4]])       # exp(-d) at the masked token would overflow
  adv = jnp.array([[1.0, 100.0, -1.0]])
  w = jnp.array([[1.0, 0.0, 1.0]])
  seg = jnp.ones((1, 3), jnp.int32)
  f = lambda lp: losses.ppo_loss(lp, behaviour, adv, w, seg, ref_logp=ref, kl_coef=0.5)[0]
  loss, g = f(logp), jax.grad(f)(logp)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(g))
  assert float(g[0, 1]) == 0.0
  r0 = np.exp(0.2)  # token 0: A>0, r = e^0.2 = 1.22 > 1.2 -> clipped at 1.2
  k3 = lambda d: np.exp(-d) - 1 + d
  expected = (-1.2 + 0.5 * k3(0.0) + (1.0 + 0.5 * k3(-0.1))) / 2
  assert r0 > 1.2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sequence_vs_token_normalisation():
  # Row: segment 1 has 3 loss tokens with per-token loss -A*r = -1 each (A=1, r=1); segment 2
  # has 1 loss token with A=-4 -> +4. Token mean: (-3 + 4)/4; sequence mean: (-1 + 4)/2.
  adv = jnp.array([[1.0, 1.0, 1.0, -4.0, 0.0]])
  seg = jnp.array([[1, 1, 1, 2, 0]])
  w = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
  z = jnp.zeros((1, 5))
  tok = losses.ppo_loss(z, z, adv, w, seg, normalization="token")[0]
  seq = losses.ppo_loss(z, z, adv, w, seg, normalization="sequence")[0]
  np.testing.assert_allclose(tok, 0.25, rtol=1e-6)
  np.testing.assert_allclose(seq, 1.5, rtol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    losses.ppo_loss(z, z, adv, w, seg, normalization="rollout")

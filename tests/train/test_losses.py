"""Hand-computed checks of the SFT cross-entropy and the shift helpers on packed rows."""

import jax.numpy as jnp
import numpy as np

from klong_jax.train import losses

LOG = np.log


def test_shift_targets_respects_segments_and_padding():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  mask = jnp.array([[0, 1, 1, 0, 1, 1]])  # mask on the pad is ignored
  targets, weights = losses.shift_targets(tokens, seg, mask)
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0]])


def test_cross_entropy_hand_values():
  # Two classes; logits [0, ln 3] -> p = [1/4, 3/4].
  lg = jnp.array([0.0, LOG(3.0)])
  logits = jnp.stack([lg, lg, lg, lg])[None]  # [1, 4, 2]
  tokens = jnp.array([[0, 1, 0, 1]])
  seg = jnp.array([[1, 1, 1, 0]])
  mask = jnp.array([[0, 1, 1, 1]])
  loss, m = losses.cross_entropy(logits, tokens, seg, mask)
  # targets: pos0 -> 1 (p=3/4), pos1 -> 0 (p=1/4); pos2 -> pad: excluded.
  expected = (-LOG(0.75) - LOG(0.25)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(m["loss_tokens"]) == 2


def test_cross_entropy_ignores_padding_logits_and_no_loss_tokens():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (2, 6)))
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  mask = jnp.array([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
  loss, _ = losses.cross_entropy(logits, tokens, seg, mask)
  garbage = logits.at[0, 4:].set(1e4).at[1, 3:].set(-1e4)  # positions with no target
  loss2, _ = losses.cross_entropy(garbage, tokens, seg, mask)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  zero, m = losses.cross_entropy(logits, tokens, seg, jnp.zeros_like(mask))
  assert float(zero) == 0.0 and float(m["loss_tokens"]) == 0


def test_packed_rows_equal_sum_of_separate_rows():
  rng = np.random.default_rng(1)
  la, lb = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
  ta, tb = rng.integers(0, 7, 4), rng.integers(0, 7, 3)
  ma, mb = np.array([0, 1, 1, 1]), np.array([0, 1, 1])
  packed = losses.cross_entropy(
      jnp.asarray(np.concatenate([la, lb]))[None], jnp.asarray(np.concatenate([ta, tb]))[None],
      jnp.array([[1] * 4 + [2] * 3]), jnp.asarray(np.concatenate([ma, mb]))[None])[1]["nll_sum"]
  sep = sum(losses.cross_entropy(jnp.asarray(lg)[None], jnp.asarray(t)[None],
                                 jnp.ones((1, len(t)), jnp.int32), jnp.asarray(m)[None]
                                 )[1]["nll_sum"] for lg, t, m in ((la, ta, ma), (lb, tb, mb)))
  np.testing.assert_allclose(packed, sep, rtol=1e-6)

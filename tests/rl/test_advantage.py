"""Group advantages: mean baseline, optional std, infra errors masked, all-equal groups counted."""

import numpy as np
import pytest

from klong_jax.rl import advantage


def test_group_mean_baseline_with_infra_errors_excluded():
  rewards = [1.0, None, 0.0, 0.5, 0.2, None]
  groups = ["a", "a", "a", "b", "b", "c"]
  adv, valid, stats = advantage.group_advantages(rewards, groups)
  # a: mean of {1, 0} = 0.5 (the None is not a 0); b: mean 0.35; c: all infra errors.
  np.testing.assert_allclose(adv, [0.5, 0.0, -0.5, 0.15, -0.15, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, False, True, True, True, False])
  assert (stats.num_groups, stats.num_masked, stats.num_empty_groups) == (3, 2, 1)
  assert stats.num_zero_groups == 0


def test_all_equal_and_singleton_groups_give_exact_zero_and_are_counted():
  rewards = [0.3, 0.3, 0.3, 0.7, None, 0.1, 0.9]
  groups = [1, 1, 1, 2, 2, 3, 3]
  adv, valid, stats = advantage.group_advantages(rewards, groups, normalize_std=True)
  assert np.all(adv[:5] == 0.0)
  assert stats.num_zero_groups == 2  # group 1 all equal; group 2 has one valid rollout
  # group 3 with std: (0.1 - 0.5) / 0.4 = -1, (0.9 - 0.5) / 0.4 = 1.
  np.testing.assert_allclose(adv[5:], [-1.0, 1.0], rtol=1e-5)
  assert stats.as_metrics()["adv/num_zero_groups"] == 2.0


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="differ in length"):
    advantage.group_advantages([1.0], ["a", "b"])
  with pytest.raises(ValueError, match="reward None"):
    advantage.group_advantages([float("nan")], ["a"])


def test_token_advantages_masks_invalid_rollouts():
  mask = np.array([0, 1, 1, 0, 1])
  adv, m = advantage.token_advantages(0.25, True, mask)
  np.testing.assert_allclose(adv, [0, 0.25, 0.25, 0, 0.25])
  np.testing.assert_array_equal(m, mask)
  adv, m = advantage.token_advantages(0.0, False, mask)
  assert not m.any() and not adv.any()

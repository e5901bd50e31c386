"""RL loss vs the sampler's logprob convention: with rl.temperature = the sampling temperature the
PPO ratio of freshly sampled tokens is exactly 1; a mismatched temperature shows up at once."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from klong_jax.model.config import get_preset
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import create_sharded_model
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

"""Shared set-up for the train-step tests: the tiny model's sharded train state on a mesh, and
the comparison two runs of the same steps must pass."""

from typing import Any

import jax
import numpy as np

from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.rules import LOGICAL_RULES, batch_sharding
from klong_jax.train import optim
from klong_jax.train import step as step_lib


def tiny_train_state(mesh: Any, ocfg: Any) -> tuple[Any, Any, Any, Any, Any]:
  """The tiny preset (seed 0) sharded on `mesh` with `ocfg`'s optimizer -> (graphdef, tx,
  state shardings, initial state, batch sharding): what make_sft_step / make_rl_step take."""
  model = create_sharded_model(get_preset("tiny"), mesh, seed=0)
  graphdef, params, rest = step_lib.split_model(model)
  tx = optim.make_optimizer(ocfg)
  sh = step_lib.state_shardings(params, rest, tx, mesh, LOGICAL_RULES)
  state = step_lib.init_state(params, rest, tx, sh)
  return graphdef, tx, sh, state, batch_sharding(mesh)


def assert_runs_match(metrics_a: list[dict], metrics_b: list[dict], params_a: Any,
                      params_b: Any) -> None:
  """Per-step metrics agree to ~1e-7 and params to atol 1e-4 (1% of one lr=1e-2 Adam step):
  Adam's m / sqrt(v) turns reduction-order noise on elements whose gradient is ~0 into O(lr)
  moves."""
  for a, b in zip(metrics_a, metrics_b, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)

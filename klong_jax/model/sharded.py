"""Build the Transformer with its params born sharded on a mesh, per the logical-axis rules."""

from __future__ import annotations

import jax
from flax import nnx

from klong_jax.model.config import ModelConfig
from klong_jax.model.transformer import Transformer
from klong_jax.parallel.rules import LOGICAL_RULES, Rules, check_divisible


def create_sharded_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0,
                         rules: Rules = LOGICAL_RULES) -> Transformer:
  """A Transformer whose params are born sharded per `rules` on `mesh` (jit-initialised)."""
  check_divisible(cfg, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    shardings = nnx.get_named_sharding(nnx.state(abstract), mesh)

    @jax.jit
    def init() -> nnx.State:
      state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))
      return jax.lax.with_sharding_constraint(state, shardings)

    state = init()
    graphdef = nnx.graphdef(abstract)
  return nnx.merge(graphdef, state)

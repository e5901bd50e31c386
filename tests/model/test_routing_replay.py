"""Routing replay (R3) in the model: replaying its own top-k is a no-op; other ids are used
verbatim while the router still gets gradients through the gate weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer


def _model(scan: bool = True) -> Transformer:
  cfg = get_preset("tiny").replace(scan_layers=scan, moe_impl="blocked", moe_block_size=8)
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _batch(b: int = 2, t: int = 12):
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 512)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return tokens, positions


@pytest.mark.parametrize("scan", [True, False])
def test_replaying_own_routing_is_exact(scan):
  model = _model(scan)
  tokens, positions = _batch()
  logits, aux = model(tokens, positions)
  cfg = model.cfg
  assert aux["moe_routing"].shape == (2, 12, cfg.num_moe_layers, cfg.num_experts_per_tok)
  replayed, aux2 = model(tokens, positions, routing=aux["moe_routing"])
  np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(aux2["moe_routing"]), np.asarray(aux["moe_routing"]))
  assert float(aux["moe_replay_flip"]) == 0.0 and float(aux2["moe_replay_flip"]) == 0.0
  # The same experts recorded in another order are the same selection: no flip counted.
  _, aux3 = model(tokens, positions, routing=aux["moe_routing"][..., ::-1])
  assert float(aux3["moe_replay_flip"]) == 0.0


def test_replaying_other_ids_changes_selection_and_router_still_learns():
  model = _model()
  tokens, positions = _batch()
  logits, aux = model(tokens, positions)
  e = model.cfg.num_experts
  other = (aux["moe_routing"] + 1) % e  # Still k distinct experts per token.
  other = other.at[0, :3].set(-1)  # Not recorded: these tokens use their own top-k.
  replayed, aux2 = model(tokens, positions, routing=other)
  used = np.asarray(aux2["moe_routing"])
  np.testing.assert_array_equal(used[1], np.asarray(other)[1])
  np.testing.assert_array_equal(used[0, 3:], np.asarray(other)[0, 3:])
  assert not np.allclose(np.asarray(replayed), np.asarray(logits))
  # Every recorded token's set differs from its own top-k; unrecorded ones are not counted.
  assert float(aux2["moe_replay_flip"]) == 1.0
  shifted = (aux["moe_routing"] + 1) % e
  half = jnp.where(jnp.arange(12)[None, :, None, None] % 2 == 0, shifted, aux["moe_routing"])
  _, aux4 = model(tokens, positions, routing=half)
  assert float(aux4["moe_replay_flip"]) == pytest.approx(0.5)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    out, _ = nnx.merge(graphdef, p, rest)(tokens, positions, routing=other)
    return jnp.mean(jax.nn.logsumexp(out, axis=-1))

  grads = jax.grad(loss)(params)
  router_grad = np.asarray(grads["moe_layers"]["mlp"]["router_de"][...])
  assert np.isfinite(router_grad).all() and np.abs(router_grad).max() > 0

"""Sharded == unsharded: forward logits, aux and gradients of one train-style loss, per mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.model.transformer import Transformer
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import (
    LOGICAL_RULES,
    activation_sharding,
    batch_sharding,
    check_divisible,
)

CFG = get_preset("tiny")
B, T = 8, 8


def _loss(model, tokens, positions):
  def loss_fn(m):
    logits, aux = m(tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return nll + 1e-2 * aux["moe_lb_loss"] + 1e-3 * aux["router_z_loss"], (logits, aux)
  (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, logits, aux, nnx.state(grads, nnx.Param)


_step = nnx.jit(_loss)


def _data():
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
  return tokens, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


@pytest.fixture(scope="module")
def reference():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  return nnx.state(model), _step(model, *_data())


@pytest.mark.parametrize("sizes,ndev,impl,create", [
    ({"data": 4}, 4, "auto", False),
    ({"fsdp": 4}, 4, "auto", True),
    ({"expert": 4}, 4, "auto", False),
    ({"tensor": 2}, 2, "auto", False),
    ({"data": 2, "expert": 2, "tensor": 2}, 8, "ragged", True),
])
def test_sharded_matches_unsharded(reference, sizes, ndev, impl, create):
  """One jit per mesh; `create` also checks create_sharded_model (else params are device_put)."""
  ref_state, ref_out = reference
  cfg = dataclasses.replace(CFG, moe_impl=impl)
  mesh = make_mesh(sizes, devices=jax.devices()[:ndev])
  if create:
    model = create_sharded_model(cfg, mesh, seed=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ref_state,
                 nnx.state(model))
  else:
    with nnx.logical_axis_rules(LOGICAL_RULES):
      shardings = nnx.get_named_sharding(ref_state, mesh)
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, jax.device_put(ref_state, shardings))
  gate = model.moe_layers.mlp.gate_edf[...]
  if sizes.get("expert", 1) > 1:
    assert gate.sharding.spec[1] == "expert"
  tokens, positions = (jax.device_put(a, batch_sharding(mesh)) for a in _data())
  with jax.set_mesh(mesh):
    out = _step(model, tokens, positions)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), ref_out, out)


def test_single_row_decode_batch_replicates_tokens():
  """Batch 1 cannot shard over the batch axes: MoE tokens fall back to replicated."""
  mesh = make_mesh({"expert": 2}, devices=jax.devices()[:2])
  model = create_sharded_model(CFG, mesh, seed=0)
  ref = Transformer(CFG, rngs=nnx.Rngs(0))
  tokens, positions = _data()
  with jax.set_mesh(mesh):
    got, _ = nnx.jit(lambda m, t, p: m(t, p))(model, tokens[:1], positions[:1])
  want, _ = nnx.jit(lambda m, t, p: m(t, p))(ref, tokens[:1], positions[:1])
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_indivisible_model_dims_name_field():
  mesh = make_mesh({"tensor": 4}, devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="num_kv_heads"):
    check_divisible(CFG, mesh)


def test_rules_table_and_helpers():
  names = [name for name, _ in LOGICAL_RULES]
  assert len(names) == len(set(names))
  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  assert batch_sharding(mesh).spec == jax.P(("data", "fsdp", "expert"), None)
  assert activation_sharding(mesh, ("act_batch", None, "act_vocab")).spec[2] == "tensor"

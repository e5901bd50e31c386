"""Context parallelism (mesh axis `context`, rules.py `act_seq`): the whole model sharded over a
row's sequence == unsharded, forward and gradient, on 8 fake CPU devices, with packed rows
(segment ids), padding, chunked MoE and the all-to-all dispatch. Two attention layouts: the
sequence re-sharded to heads (kv heads divide over tensor x context) and the all-gathered
sequence (they do not)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.mesh import make_mesh

B, T = 4, 16


def _batch(cfg):
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  # Packed rows: segments 1 (9 tokens), 2 (4), padding 0 (3); positions restart per segment.
  seg = jnp.broadcast_to(jnp.array([1] * 9 + [2] * 4 + [0] * 3), (B, T))
  pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(9), jnp.arange(4), jnp.arange(3)]), (B, T))
  return tokens, pos, seg


def _run(cfg, sizes):
  size = int(np.prod(list(sizes.values())))
  mesh = make_mesh(sizes, devices=jax.devices()[:size])
  model = create_sharded_model(cfg, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens, pos, seg = _batch(cfg)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p, rest)(tokens, pos, seg)
    real = (seg > 0)[..., None]
    return (jnp.sum(jax.nn.logsumexp(logits, axis=-1, keepdims=True) * real)
            + aux["moe_lb_loss"] + aux["router_z_loss"]), (logits, aux)

  with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    text = fn.lower(params).as_text()
    return fn(params), text


@pytest.mark.slow
@pytest.mark.parametrize("sizes,kv_heads", [
    ({"expert": 2, "fsdp": 2, "context": 2}, 2),  # Sequence -> heads (all-to-all).
    ({"fsdp": 2, "context": 4}, 2),               # kv heads 2 < context 4: gathered sequence.
], ids=["heads", "gather"])
def test_context_parallel_equals_unsharded(sizes, kv_heads):
  cfg = dataclasses.replace(get_preset("tiny"), num_kv_heads=kv_heads, moe_impl="blocked",
                            moe_block_size=4, moe_token_chunk=8, attention_impl="blockwise",
                            attention_block_q=4, attention_block_kv=4).validate()
  (got_loss, (got_logits, got_aux)), got_grads = _run(cfg, sizes)[0]
  (want_loss, (want_logits, want_aux)), want_grads = _run(cfg, {"fsdp": 1})[0]
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5)
  for name in ("moe_lb_loss", "router_z_loss", "moe_expert_load", "moe_routing"):
    np.testing.assert_allclose(got_aux[name], want_aux[name], atol=1e-6, err_msg=name)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=3e-5)


@pytest.mark.slow
def test_sequence_is_sharded_over_context():
  """The residual stream really is split over `context` (the test above can fail for CP that
  silently replicates): the lowered step constrains [B, T, D] activations to it."""
  cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, moe_impl="blocked",
                            moe_block_size=4).validate()
  _, text = _run(cfg, {"fsdp": 4, "context": 2})
  assert '"context"' in text or "context" in text
  spec = f'tensor<{B}x{T}x{cfg.hidden_size}xf32>'
  lines = [ln for ln in text.splitlines() if "sharding_constraint" in ln and spec in ln]
  assert lines and all("context" in ln for ln in lines), lines[:3]

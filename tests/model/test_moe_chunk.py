"""MoE token chunking (model/moe_chunk.py): chunked == unchunked, forward and gradient, on 8 fake
CPU devices for the all-to-all (expert 8; expert 4 x fsdp 2) and all-gather dispatches, with
padding tokens, a chunk that does not divide the row, routing replay, and equal MoE statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model import moe_chunk
from klong_jax.model.config import ConfigError, get_preset
from klong_jax.model.moe import MoE, routed_experts
from klong_jax.parallel.mesh import make_mesh

B, T = 8, 12
# Row lengths of real tokens (the rest is padding, segment 0).
LENGTHS = jnp.array([12, 10, 5, 12, 12, 3, 12, 8])


def _assert_same(got, want, atol=2e-6):
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=atol)


def _inputs(seed=0, d=16, f=8, e=8, k=2):
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (B, T, d))
  _, idx = jax.lax.top_k(jax.random.normal(keys[1], (B, T, e)), k)
  w = jax.random.uniform(keys[2], (B, T, k))
  wg, wu = (jax.random.normal(key, (e, d, f)) / 4 for key in keys[3:5])
  wd = jax.random.normal(keys[5], (e, f, d)) / 4
  return x, idx.astype(jnp.int32), w, wg, wu, wd


@pytest.mark.parametrize("chunk", [5, pytest.param(4, marks=pytest.mark.slow)])  # 5: padded to 15.
@pytest.mark.parametrize("dispatch,sizes", [
    ("a2a", {"expert": 8}),
    pytest.param("allgather", {"expert": 8}, marks=pytest.mark.slow, id="allgather-expert8"),
    pytest.param("a2a", {"expert": 4, "fsdp": 2}, marks=pytest.mark.slow, id="a2a-expert4xfsdp2"),
])
def test_chunked_routed_equals_unchunked(dispatch, sizes, chunk):
  mask = jnp.arange(T)[None] < LENGTHS[:, None]

  def run(x, idx, w, wg, wu, wd, chunk):
    def fn(x, idx, w, m):
      return routed_experts(x, idx, w, wg, wu, wd, impl="blocked", block_size=4,
                            dispatch=dispatch, mask=m)
    if not chunk:
      return fn(x.reshape(B * T, -1), idx.reshape(B * T, -1), w.reshape(B * T, -1),
                mask.reshape(-1))[0].reshape(x.shape)
    return moe_chunk.chunked_routed(fn, chunk, x, idx, w, mask)

  def value_and_grad(args, chunk):
    loss = lambda *a: jnp.sum(jnp.sin(run(*a, chunk)) * mask[..., None])
    return (jax.jit(run, static_argnums=6)(*args, chunk),
            jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5)))(*args))

  args = _inputs()
  with jax.set_mesh(make_mesh(sizes)):
    want = value_and_grad(args, 0)
    got = value_and_grad(args, chunk)
    text = jax.jit(run, static_argnums=6).lower(*args, chunk).as_text()
  _assert_same(got, want)
  assert "stablehlo.while" in text  # The chunks run in a loop (one chunk's buffers at a time).


def _tiny(**changes):
  return dataclasses.replace(get_preset("tiny"), **changes).validate()


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["a2a", "allgather"])
def test_moe_layer_chunked_equals_unchunked_with_replay_and_padding(dispatch):
  """The whole layer (router over the full row, chunked experts, shared expert): outputs, input
  and parameter gradients, routing ids, lb / z losses, expert load, replay flips all equal."""
  cfg = _tiny(moe_impl="blocked", moe_block_size=4, moe_dispatch=dispatch)
  x = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size))
  mask = jnp.arange(T)[None] < LENGTHS[:, None]
  replay = jax.random.randint(jax.random.key(4), (B, T, 1), 0, cfg.num_experts)
  replay = jnp.concatenate([replay, (replay + 3) % cfg.num_experts], axis=-1)
  replay = replay.at[0].set(-1)  # Row 0 unrecorded: its own top-k.
  outs = {}
  for chunk in (0, 5):
    layer = MoE(dataclasses.replace(cfg, moe_token_chunk=chunk), rngs=nnx.Rngs(0))

    def loss(m, x):
      y, aux = m(x, replay, mask)
      return jnp.sum(jnp.sin(y)) + aux["moe_lb_loss"] + aux["router_z_loss"], (y, aux)

    with jax.set_mesh(make_mesh({"expert": 8})):
      grads, (y, aux) = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
    outs[chunk] = (y, aux, nnx.state(grads[0], nnx.Param), grads[1])
  assert set(outs[5][1]) == set(outs[0][1])
  _assert_same(outs[5], outs[0])
  assert float(outs[0][1]["moe_replay_flip"]) > 0  # Replay really replaced some choices.


def test_config_validation():
  assert _tiny().moe_token_chunk == 0
  assert _tiny(moe_token_chunk=4096).moe_token_chunk == 4096
  with pytest.raises(ConfigError, match="moe_token_chunk"):
    _tiny(moe_token_chunk=-1)
  with pytest.raises(ConfigError, match="moe_token_chunk.*capacity"):
    _tiny(moe_token_chunk=8, moe_impl="capacity")
  with pytest.raises(ValueError, match="moe_token_chunk"):
    moe_chunk.chunked_routed(None, 0, *_inputs()[:3], jnp.ones((B, T), bool))

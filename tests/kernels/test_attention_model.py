"""The Transformer with attention_impl=blockwise == reference (logits and parameter grads, packed
rows), and chunked prefill + decode through the blockwise cache path == one full forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer
from tests.kernels import jaxpr_walk

BASE = dataclasses.replace(get_preset("tiny"), qk_norm=True)
BLOCKWISE = dataclasses.replace(BASE, attention_impl="blockwise", attention_block_q=8,
                                attention_block_kv=16)


def _loss_and_grads(cfg, tokens, positions, segment_ids):
  model = Transformer(cfg, rngs=nnx.Rngs(0))  # Same seed: same weights for every cfg.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens, positions, segment_ids)
    return jnp.mean(jnp.sin(logits)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.slow  # Two tiny-model grad compiles: ~20 s of CPU.
@pytest.mark.parametrize("remat", ["none", "save_dots"])
def test_transformer_blockwise_equals_reference_logits_and_grads(remat):
  b, t = 2, 37  # Uneven against both blocks.
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, BASE.vocab_size)
  segment_ids = jnp.array([[1] * 9 + [2] * 20 + [0] * 8, [5] * 37], jnp.int32)
  positions = jnp.concatenate([jnp.arange(9), jnp.arange(20), jnp.arange(8)])[None]
  positions = jnp.concatenate([positions, jnp.arange(t)[None]]).astype(jnp.int32)
  ref_logits, ref_grads = _loss_and_grads(
      dataclasses.replace(BASE, attention_impl="reference"), tokens, positions, segment_ids)
  logits, grads = _loss_and_grads(dataclasses.replace(BLOCKWISE, remat_policy=remat), tokens,
                                  positions, segment_ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5, rtol=1e-4)
  flat_ref = jax.tree.leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref)
  for (path, want), got in zip(flat_ref, flat, strict=True):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * scale, rtol=1e-3,
                               err_msg=jax.tree_util.keystr(path))


@nnx.jit(static_argnums=(3,))
def _decode(model, tokens, positions, _shape_key, cache):
  return model.decode(tokens, positions, cache)


def test_chunked_prefill_and_decode_equal_full_forward_blockwise():
  model = Transformer(BLOCKWISE, rngs=nnx.Rngs(0))
  b, total, max_len = 2, 24, 40
  tokens = jax.random.randint(jax.random.key(2), (b, total), 0, BASE.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total))
  want, _ = nnx.jit(lambda m, t, p: m(t, p))(model, tokens, pos)
  cache = model.init_cache(b, max_len)
  got = []
  for lo, hi in ((0, 12), (12, 19), *((i, i + 1) for i in range(19, total))):
    logits, cache = _decode(model, tokens[:, lo:hi], pos[:, lo:hi], hi - lo, cache)
    got.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want),
                             atol=2e-5, rtol=1e-4)


def test_prefill_builds_no_query_by_cache_buffer():
  # Prefill of 12 tokens into a 40-slot cache: no value may carry both a 12 and a 40 dim
  # (the reference builds [B,12,40] masks and [B,K,G,12,40] scores).
  def shapes_of(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 40)
    tokens = jnp.zeros((2, 12), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    jaxpr = jax.make_jaxpr(lambda s, c: nnx.merge(graphdef, s).decode(tokens, pos, c))(
        state, cache)
    return [s for s in jaxpr_walk.intermediate_shapes(jaxpr.jaxpr) if 12 in s and 40 in s]

  assert shapes_of(BLOCKWISE) == []
  assert shapes_of(dataclasses.replace(BASE, attention_impl="reference"))  # The check can fail.





@pytest.mark.slow  # Splash in Pallas interpret mode inside a sharded tiny model.
def test_sharded_transformer_splash_equals_reference():
  # data=2 x tensor=2: Attention passes the act_batch / act_heads mesh axes, splash runs per shard.
  from klong_jax.model.sharded import create_sharded_model
  from klong_jax.parallel.mesh import make_mesh
  from klong_jax.parallel.rules import batch_sharding
  b, t = 2, 40
  tokens = jax.random.randint(jax.random.key(3), (b, t), 0, BASE.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segment_ids = jnp.array([[1] * 15 + [2] * 25, [1] * 40], jnp.int32)
  ref = Transformer(dataclasses.replace(BASE, attention_impl="reference"), rngs=nnx.Rngs(0))
  want, _ = nnx.jit(lambda m, t, p, s: m(t, p, s))(ref, tokens, positions, segment_ids)
  mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  model = create_sharded_model(dataclasses.replace(BASE, attention_impl="splash"), mesh, seed=0)
  args = (jax.device_put(a, batch_sharding(mesh)) for a in (tokens, positions, segment_ids))
  with jax.set_mesh(mesh):
    got, _ = nnx.jit(lambda m, t, p, s: m(t, p, s))(model, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)

"""Transformer: cached decode == full forward, packed == unpacked, scan == unrolled, remat, bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer

CFG = dataclasses.replace(get_preset("tiny"), qk_norm=True)  # Exercise every attention option.


@nnx.jit
def _forward(model, tokens, positions, segment_ids=None):
  return model(tokens, positions, segment_ids)


@nnx.jit
def _decode(model, tokens, positions, cache):
  return model.decode(tokens, positions, cache)


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def _arange(batch, length):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def test_forward_shapes_and_aux(model):
  logits, aux = _forward(model, _tokens((2, 10)), _arange(2, 10))
  assert logits.shape == (2, 10, CFG.vocab_size) and logits.dtype == jnp.float32
  assert aux["moe_lb_loss"].shape == () and aux["router_z_loss"].shape == ()
  assert aux["moe_expert_load"].shape == (CFG.num_moe_layers, CFG.num_experts)
  np.testing.assert_allclose(jnp.sum(aux["moe_expert_load"], -1), 1.0, rtol=1e-6)


def test_prefill_then_decode_matches_full_forward(model):
  tokens = _tokens((2, 12), seed=1)
  full, _ = _forward(model, tokens, _arange(2, 12))
  cache = model.init_cache(batch=2, max_len=16, dtype=jnp.float32)
  logits, cache = _decode(model, tokens[:, :6], _arange(2, 6), cache)
  np.testing.assert_allclose(logits, full[:, :6], atol=2e-5)
  for t in range(6, 12):
    logits, cache = _decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5)


def test_rows_at_different_positions_and_row_reuse(model):
  """Row 0 decodes one long sequence; row 1 decodes B, then restarts on C from position 0."""
  seq_a, seq_b, seq_c = _tokens((1, 10), 2)[0], _tokens((1, 5), 3)[0], _tokens((1, 5), 4)[0]
  full = {name: _forward(model, s[None], _arange(1, len(s)))[0][0]
          for name, s in (("a", seq_a), ("b", seq_b), ("c", seq_c))}
  row1 = [("b", i) for i in range(5)] + [("c", i) for i in range(5)]
  cache = model.init_cache(batch=2, max_len=16)
  seqs = {"b": seq_b, "c": seq_c}
  for step in range(10):
    name, pos = row1[step]
    tokens = jnp.array([[seq_a[step]], [seqs[name][pos]]], jnp.int32)
    positions = jnp.array([[step], [pos]], jnp.int32)
    logits, cache = _decode(model, tokens, positions, cache)
    np.testing.assert_allclose(logits[0, 0], full["a"][step], atol=2e-5)
    np.testing.assert_allclose(logits[1, 0], full[name][pos], atol=2e-5)


def test_packed_rows_equal_unpacked(model):
  first, second = _tokens((1, 5), 5), _tokens((1, 7), 6)
  packed = jnp.concatenate([first, second], axis=1)
  positions = jnp.concatenate([_arange(1, 5), _arange(1, 7)], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7], jnp.int32)
  logits, _ = _forward(model, packed, positions, segments)
  np.testing.assert_allclose(logits[:, :5], _forward(model, first, _arange(1, 5))[0], atol=2e-5)
  np.testing.assert_allclose(logits[:, 5:], _forward(model, second, _arange(1, 7))[0], atol=2e-5)


def _loss_and_grads(model, tokens, positions):
  def loss_fn(m):
    logits, aux = m(tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return nll + 1e-2 * aux["moe_lb_loss"] + 1e-3 * aux["router_z_loss"], logits
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, logits, grads


_step = nnx.jit(_loss_and_grads)  # Module-level: the fp32 reference compiles once.


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(remat_policy="full"),
                                     dict(remat_policy="save_dots", scan_layers=False)])
def test_scan_and_remat_variants_match(model, changes):
  """Same params (layout does not depend on scan/remat) -> same loss, logits and grads."""
  other = Transformer(dataclasses.replace(CFG, **changes), rngs=nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(other))
  tokens, positions = _tokens((2, 8), 7), _arange(2, 8)
  ref, got = _step(model, tokens, positions), _step(other, tokens, positions)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ref, got)


def test_bf16_compute_with_fp32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  ref = Transformer(CFG, rngs=nnx.Rngs(0))
  tokens, positions = _tokens((2, 8), 7), _arange(2, 8)
  loss, logits, grads = _step(model, tokens, positions)
  ref_loss, _, _ = _step(ref, tokens, positions)
  assert logits.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert bool(jnp.isfinite(loss)) and abs(float(loss) - float(ref_loss)) < 2e-2

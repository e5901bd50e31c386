"""kernels/vocab: tiled logprobs == the full-logits reference (values and gradients, tied and
untied heads, temperature, bf16, padded tiles, 8 fake devices), no [tokens, V] buffer in the
tiled graph, and the SFT / RL steps equal with vocab tiling on and off."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import sft_tiny
from klong_jax.kernels import vocab
from klong_jax.kernels.vocab import reference, tiled
from klong_jax.model.config import get_preset
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES
from klong_jax.rl import step as rl_step
from klong_jax.train import step as step_lib
from tests.kernels import jaxpr_walk
from tests.train.step_testlib import assert_runs_match, tiny_train_state


def _inputs(b=2, t=13, d=16, v=97, dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (b, t, d)).astype(dtype)
  head = (jax.random.normal(k[1], (d, v)) * 0.4).astype(dtype)
  targets = jax.random.randint(k[2], (b, t), 0, v)
  # Cotangents for logp and lse: the test's loss weighs both outputs, so both backward terms count.
  return hidden, head, targets, jax.random.normal(k[3], (b, t)), jax.random.normal(k[4], (b, t))


def _loss(fn, targets, g_lp, g_lse):
  def loss(hidden, head):
    logp, lse = fn(hidden, head, targets)
    return jnp.sum(logp * g_lp) + jnp.sum(lse * g_lse)
  return loss


def _both(layout, temperature, **chunks):
  def ref(h, w, t):
    return reference.token_logprobs_from_hidden(h, w, t, head_layout=layout,
                                                temperature=temperature, return_lse=True)

  def til(h, w, t):
    return tiled.token_logprobs_from_hidden(h, w, t, head_layout=layout,
                                            temperature=temperature, return_lse=True, **chunks)
  return ref, til


def test_blocks_prefers_a_dividing_count_and_pads_otherwise():
  assert tiled.blocks(151552, 8192) == (32, 4736)  # GLM-4.5 vocab: no padding, 128-aligned
  assert tiled.blocks(96, 40) == (3, 32)
  assert tiled.blocks(97, 32) == (4, 25)            # prime: 4 blocks, 3 padded columns
  assert tiled.blocks(64, 2048) == (1, 64)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [dict(chunk_tokens=4, chunk_vocab=32),   # T, V padded
                                    dict(chunk_tokens=13, chunk_vocab=97),  # one tile
                                    dict(chunk_tokens=1, chunk_vocab=1)])   # one column a tile
def test_tiled_equals_reference_fp32(layout, temperature, chunks):
  hidden, head, targets, g_lp, g_lse = _inputs()
  if layout == "vd":
    head = head.T
  ref, til = _both(layout, temperature, **chunks)
  for a, b in zip(ref(hidden, head, targets), jax.jit(til)(hidden, head, targets), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  ga = jax.grad(_loss(ref, targets, g_lp, g_lse), argnums=(0, 1))(hidden, head)
  gb = jax.jit(jax.grad(_loss(til, targets, g_lp, g_lse), argnums=(0, 1)))(hidden, head)
  for a, b in zip(ga, gb, strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_flat_tokens_and_masked_loss_gradient():
  """[N, D] input; a masked mean loss (padding weights 0) gives the reference's gradients."""
  hidden, head, targets, _, _ = _inputs(b=1, t=40)
  weights = (jnp.arange(40) % 3 != 0).astype(jnp.float32)

  def ce(fn):
    return lambda h, w: -jnp.sum(fn(h, w, targets[0]) * weights) / weights.sum()
  ref = ce(lambda h, w, t: reference.token_logprobs_from_hidden(h[None], w, t[None])[0])
  til = ce(lambda h, w, t: tiled.token_logprobs_from_hidden(h, w, t, chunk_tokens=16,
                                                            chunk_vocab=20))
  np.testing.assert_allclose(ref(hidden[0], head), jax.jit(til)(hidden[0], head), rtol=1e-6)
  ga = jax.grad(ref, argnums=(0, 1))(hidden[0], head)
  gb = jax.jit(jax.grad(til, argnums=(0, 1)))(hidden[0], head)
  for a, b in zip(ga, gb, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_tiled_equals_reference_bf16(layout):
  """bf16 hidden and head: fp32 logsumexp either way; gradients come back in bf16 and agree to
  bf16 rounding (the tiled backward feeds dz to the matmuls in bf16, as TPU kernels do)."""
  hidden, head, targets, g_lp, g_lse = _inputs(t=24, d=32, v=200, dtype=jnp.bfloat16)
  if layout == "vd":
    head = head.T
  ref, til = _both(layout, 0.8, chunk_tokens=7, chunk_vocab=48)
  for a, b in zip(ref(hidden, head, targets), jax.jit(til)(hidden, head, targets), strict=True):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # same bf16 products, fp32 sums
  ga = jax.grad(_loss(ref, targets, g_lp, g_lse), argnums=(0, 1))(hidden, head)
  gb = jax.jit(jax.grad(_loss(til, targets, g_lp, g_lse), argnums=(0, 1)))(hidden, head)
  for a, b in zip(ga, gb, strict=True):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()


def _max_intermediate(jaxpr) -> int:
  """Largest element count of any value computed in a jaxpr, sub-jaxprs (scan bodies) included."""
  return max((int(np.prod(s)) for s in jaxpr_walk.intermediate_shapes(jaxpr)), default=0)


def test_no_full_logits_buffer_in_forward_or_backward():
  b, t, d, v = 2, 64, 8, 1000
  hidden, head, targets, g_lp, g_lse = _inputs(b=b, t=t, d=d, v=v)
  ref, til = _both("dv", 1.0, chunk_tokens=16, chunk_vocab=100)
  grad = jax.grad(_loss(til, targets, g_lp, g_lse), argnums=(0, 1))
  biggest = _max_intermediate(jax.make_jaxpr(grad)(hidden, head).jaxpr)
  assert biggest <= max(b * 16 * 100, d * v), biggest  # one tile, or the head (its gradient)
  ref_grad = jax.grad(_loss(ref, targets, g_lp, g_lse), argnums=(0, 1))
  assert _max_intermediate(jax.make_jaxpr(ref_grad)(hidden, head).jaxpr) >= b * t * v


def test_tiled_under_mesh_with_sharded_inputs():
  """8 fake devices: hidden over the batch axes, head over (embed -> fsdp, vocab -> tensor)."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  hidden, head, targets, g_lp, g_lse = _inputs(b=4, t=12, d=16, v=96)
  ref, til = _both("dv", 0.9, chunk_tokens=5, chunk_vocab=24)
  sh = lambda *spec: jax.sharding.NamedSharding(mesh, jax.P(*spec))  # noqa: E731
  args = (jax.device_put(hidden, sh(("data", "fsdp"))), jax.device_put(head, sh("fsdp", "tensor")))
  fn = jax.value_and_grad(_loss(til, targets, g_lp, g_lse), argnums=(0, 1))
  with jax.set_mesh(mesh):
    val, grads = jax.jit(fn, out_shardings=(sh(), (args[0].sharding, args[1].sharding)))(*args)
  rval, rgrads = jax.value_and_grad(_loss(ref, targets, g_lp, g_lse), argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  for a, b in zip(rgrads, grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dispatcher_and_config():
  hidden, head, targets, _, _ = _inputs()
  cfg = ml_collections.ConfigDict(dict(vocab_tiling=True, vocab_chunk_tokens=5,
                                       vocab_chunk_vocab=30))
  loss_cfg = vocab.VocabLoss.from_config(cfg)
  assert loss_cfg == vocab.VocabLoss("tiled", 5, 30)
  assert vocab.VocabLoss.from_config(ml_collections.ConfigDict(dict(vocab_tiling=False))) is None
  assert vocab.VocabLoss.from_config(ml_collections.ConfigDict()) == vocab.VocabLoss()
  assert sft_tiny.get_config().optim.vocab_tiling  # configs/common.py: on by default
  a = vocab.token_logprobs_from_hidden(hidden, head, targets, vocab_loss=loss_cfg)
  b = vocab.token_logprobs_from_hidden(hidden, head, targets,
                                       vocab_loss=dataclasses.replace(loss_cfg, impl="reference"))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="impl"):
    vocab.VocabLoss("dense")


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_model_hidden_path_matches_its_logits(tie):
  """Transformer(return_hidden=True) + head() through the tiled CE == CE of the model's logits."""
  from flax import nnx

  from klong_jax.model.transformer import Transformer
  from klong_jax.train import losses

  model = Transformer(dataclasses.replace(get_preset("tiny"), tie_embeddings=tie),
                      rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
  rest = (batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  logits, _ = nnx.jit(lambda m, *a: m(*a))(model, *inputs)
  hidden, _ = nnx.jit(lambda m, *a: m(*a, return_hidden=True))(model, *inputs)
  assert hidden.shape == (*batch["tokens"].shape, model.cfg.hidden_size)
  assert model.head()[1] == ("vd" if tie else "dv")
  want, wm = losses.cross_entropy(logits, *rest)
  got, gm = losses.cross_entropy_from_hidden(hidden, model.head(), *rest,
                                             vocab_loss=vocab.VocabLoss("tiled", 16, 100))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(gm["loss_tokens"]) == float(wm["loss_tokens"]) > 0


# --- The SFT and RL steps, vocab tiling on vs off ------------------------------------------------

B, L = 8, 40
TILES = dict(vocab_tiling=True, vocab_chunk_tokens=16, vocab_chunk_vocab=100)  # 3 x 6 tiles


def _batch(rl=False):
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, 24:] = 2
  seg[::2, 34:] = 0
  pos = np.concatenate([np.arange(24), np.arange(L - 24)])
  batch = {"tokens": rng.integers(0, 512, (B, L)).astype(np.int32),
           "positions": np.tile(pos, (B, 1)).astype(np.int32) * (seg > 0), "segment_ids": seg,
           "loss_mask": (rng.random((B, L)) < 0.6).astype(np.int32) * (seg > 0)}
  if rl:
    batch["logprobs"] = (-rng.random((B, L)) * 3).astype(np.float32) * batch["loss_mask"]
    batch["advantages"] = rng.normal(size=(B, L)).astype(np.float32) * batch["loss_mask"]
  return batch


def _optim_cfg(**kw):
  c = sft_tiny.get_config().optim
  c.update(dict(lr=1e-2, warmup_steps=1, total_steps=10, lb_coef=1e-2, z_coef=1e-3,
                expert_bias_rate=1e-2, compute_dtype="float32"))
  c.update(kw)
  return c


def _run(mesh, ocfg, rl_cfg=None, steps=2):
  """`steps` SFT (or RL, with `rl_cfg`) steps on one batch -> (host params, metrics list)."""
  graphdef, tx, sh, state, bsh = tiny_train_state(mesh, ocfg)
  batch = {k: jax.device_put(v, bsh) for k, v in _batch(rl_cfg is not None).items()}
  if rl_cfg is None:
    fn = step_lib.make_sft_step(graphdef, tx, ocfg, sh, bsh, LOGICAL_RULES)
  else:  # Reference policy != policy (perturbed), so the KL term and its logprobs count.
    ref = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.05, p), out_shardings=sh.params)(
        state.params)
    step = rl_step.make_rl_step(graphdef, tx, ocfg, rl_cfg, sh, bsh, LOGICAL_RULES)
    fn = lambda s, b: step(s, ref, b)  # noqa: E731
  out = []
  for _ in range(steps):
    state, m = fn(state, batch)
    out.append({k: float(v) for k, v in m.items()})
  return jax.device_get(state.params), out


def _assert_same(a, b):
  (pa, ma), (pb, mb) = a, b
  assert_runs_match(ma, mb, pa, pb)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 1}, {"fsdp": 4, "tensor": 2}])
def test_sft_step_tiling_on_equals_off(mesh_sizes):
  devices = jax.devices()[:1] if mesh_sizes == {"fsdp": 1} else None
  mesh = make_mesh(mesh_sizes, devices=devices)
  off = _run(mesh, _optim_cfg(vocab_tiling=False))
  on = _run(mesh, _optim_cfg(**TILES))
  assert off[1][0]["loss_tokens"] > 0
  _assert_same(off, on)


@pytest.mark.slow
def test_rl_step_tiling_on_equals_off():
  """Tempered (T=0.7) policy logprobs and the reference's, on 8 devices (fsdp x tensor)."""
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  rl_cfg = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                                          kl_estimator="k3", ratio_cap=4.0,
                                          normalization="token", temperature=0.7,
                                          routing_replay=False))
  off = _run(mesh, _optim_cfg(vocab_tiling=False), rl_cfg)
  on = _run(mesh, _optim_cfg(**TILES), rl_cfg)
  assert abs(off[1][0]["kl"]) > 1e-6  # the reference policy's logprobs really enter
  _assert_same(off, on)

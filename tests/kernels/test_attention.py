"""Attention backends == reference (forward and d/dq, dk, dv): packed rows, GQA, uneven lengths,
fp32 and bf16; the KV-cache path; the dispatcher; no T x T buffer in the blockwise jaxpr."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.kernels import attention as kernels
from klong_jax.kernels.attention import blockwise, cudnn, reference, splash
from klong_jax.model.config import ATTENTION_IMPLS, ConfigError, ModelConfig
from tests.kernels import jaxpr_walk

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _qkv(batch, length, heads, kv_heads, dtype, head_dim=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, length, heads, head_dim), jnp.float32)
  k = jax.random.normal(ks[1], (batch, length, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(ks[2], (batch, length, kv_heads, head_dim), jnp.float32)
  w = jax.random.normal(ks[3], (batch, length, heads, head_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def _packed(batch, length):
  """Row 0: three segments then padding (id 0); row 1: two segments, no padding; row 2+: one."""
  rows = []
  for b in range(batch):
    if b == 0:
      cuts = [0, length // 5, length // 2, length - length // 6]
      ids = np.zeros(length, np.int32)
      for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        ids[lo:hi] = i + 1
    elif b == 1:
      ids = np.where(np.arange(length) < length // 3, 7, 9).astype(np.int32)
    else:
      ids = np.full(length, 1, np.int32)
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def _fwd_and_grads(fn, q, k, v, w):
  """Output (fp32) and the grads of sum(out * w) wrt q, k, v (fp32)."""
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  out = jax.jit(fn)(q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return [x.astype(jnp.float32) for x in (out, *grads)]


def _assert_matches(fn, q, k, v, w, segment_ids):
  want = _fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, segment_ids), q, k, v, w)
  got = _fwd_and_grads(fn, q, k, v, w)
  tol = TOL[q.dtype.type]
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    scale = float(jnp.max(jnp.abs(b))) + 1.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * scale, rtol=tol,
                               err_msg=name)


@pytest.mark.parametrize("dtype,group,packed", [
    (jnp.float32, 1, True), (jnp.float32, 2, False), (jnp.float32, 4, True),
    (jnp.bfloat16, 1, False), (jnp.bfloat16, 2, True), (jnp.bfloat16, 4, True)])
def test_blockwise_equals_reference(dtype, group, packed):
  # T=37 is uneven against both blocks (8 and 16): padded queries and kv slots must stay invisible.
  q, k, v, w = _qkv(3, 37, 2 * group, 2, dtype)
  seg = _packed(3, 37) if packed else None
  _assert_matches(lambda q, k, v: blockwise.attention(q, k, v, seg, block_q=8, block_kv=16),
                  q, k, v, w, seg)


def test_blockwise_one_block_and_square_blocks():
  q, k, v, w = _qkv(2, 64, 4, 2, jnp.float32)
  seg = _packed(2, 64)
  for bq, bk in ((64, 64), (32, 8)):
    _assert_matches(lambda q, k, v, bq=bq, bk=bk: blockwise.attention(
        q, k, v, seg, block_q=bq, block_kv=bk), q, k, v, w, seg)


@pytest.mark.slow  # Pallas interpret mode: ~10-30 s per case on a shared 2-core box.
@pytest.mark.parametrize("dtype,group,packed", [(jnp.float32, 4, True), (jnp.bfloat16, 2, True),
                                                (jnp.float32, 1, False)])
def test_splash_interpret_equals_reference(dtype, group, packed):
  # 200 tokens: padded to the kernel's 128-lane blocks (2 blocks of 128).
  q, k, v, w = _qkv(2, 200, 2 * group, 2, dtype)
  seg = _packed(2, 200) if packed else None
  _assert_matches(lambda q, k, v: splash.attention(q, k, v, seg, block_q=128, block_kv=128,
                                                   interpret=True), q, k, v, w, seg)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_call_masks_like_reference_through_xla(packed):
  # The cuDNN kernel needs a GPU; the same jax.nn.dot_product_attention call via XLA checks the
  # causal flag, the segment mask and the GQA layout.
  q, k, v, w = _qkv(2, 24, 8, 2, jnp.float32)
  seg = _packed(2, 24) if packed else None
  _assert_matches(lambda q, k, v: cudnn.attention(q, k, v, seg, implementation="xla"),
                  q, k, v, w, seg)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_equals_reference_on_gpu(packed):
  q, k, v, w = _qkv(2, 128, 8, 2, jnp.bfloat16, head_dim=64)
  seg = _packed(2, 128) if packed else None
  _assert_matches(lambda q, k, v: cudnn.attention(q, k, v, seg), q, k, v, w, seg)


@pytest.mark.parametrize("length", [1, 5, 12])
def test_cache_attention_equals_reference(length):
  # Rows at different offsets in a 45-slot cache (uneven vs block 16); slots past a row's position
  # hold junk that must stay invisible.
  q, _, _, _ = _qkv(3, length, 4, 2, jnp.float32)
  _, kc, vc, _ = _qkv(3, 45, 4, 2, jnp.float32, seed=1)
  start = jnp.array([0, 7, 45 - length])
  positions = start[:, None] + jnp.arange(length)[None, :]
  want = reference.cache_attention(q, kc, vc, positions)
  got = blockwise.cache_attention(q, kc, vc, positions, block_q=4, block_kv=16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  via = kernels.attend_cache(q, kc, vc, positions, impl="blockwise", block_q=4, block_kv=16)
  np.testing.assert_allclose(np.asarray(via), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_dispatch_resolves_by_platform_and_validates():
  assert kernels.resolve("auto", jnp.bfloat16, True, 64, "tpu") == "splash"
  assert kernels.resolve("auto", jnp.bfloat16, False, 4096, "gpu") == "cudnn"
  assert kernels.resolve("auto", jnp.bfloat16, True, 4096, "gpu") == "blockwise"  # No T x T mask.
  assert kernels.resolve("auto", jnp.float32, False, 4096, "gpu") == "blockwise"  # cuDNN: 16-bit.
  assert kernels.resolve("auto", jnp.float32, False, 129, "cpu") == "blockwise"
  assert kernels.resolve("auto", jnp.float32, False, 128, "cpu") == "reference"  # One tile.
  assert kernels.resolve("reference", jnp.float32, False, 8192, "tpu") == "reference"
  assert kernels.IMPLS == ATTENTION_IMPLS
  with pytest.raises(ValueError, match="not in"):
    kernels.resolve("flash", jnp.float32, False, 8)
  q, k, v, _ = _qkv(2, 20, 4, 2, jnp.float32)
  seg = _packed(2, 20)
  want = reference.attention(q, k, v, seg)
  for impl in ("reference", "blockwise", "auto"):
    got = kernels.attend(q, k, v, segment_ids=seg, impl=impl, block_q=8, block_kv=8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_config_field_validation():
  assert ModelConfig().attention_impl == "auto"
  assert ModelConfig().replace(attention_impl="splash", attention_block_q=256).attention_block_q \
      == 256
  with pytest.raises(ConfigError, match="attention_impl"):
    ModelConfig().replace(attention_impl="flash")
  with pytest.raises(ConfigError, match="attention_block_kv"):
    ModelConfig().replace(attention_block_kv=-1)



def test_blockwise_has_no_t_by_t_value_forward_or_backward():
  t = 256
  q, k, v, w = _qkv(1, t, 4, 2, jnp.float32)
  seg = _packed(1, t)

  def loss(q, k, v, fn):
    return jnp.sum(fn(q, k, v, seg) * w)

  def big(shapes):
    return [s for s in shapes if sum(d >= t for d in s) >= 2]

  jaxpr = jax.make_jaxpr(jax.value_and_grad(
      lambda q, k, v: loss(q, k, v, lambda *a: blockwise.attention(*a, block_q=32, block_kv=32)),
      argnums=(0, 1, 2)))(q, k, v)
  assert big(jaxpr_walk.intermediate_shapes(jaxpr.jaxpr)) == []
  ref = jax.make_jaxpr(jax.value_and_grad(lambda q, k, v: loss(q, k, v, reference.attention),
                                          argnums=(0, 1, 2)))(q, k, v)
  assert big(jaxpr_walk.intermediate_shapes(ref.jaxpr))  # The check can see a T x T buffer.


def test_shard_rows_under_a_mesh_equals_reference():
  # shard_map over batch (data=2) and heads (tensor=2) on fake CPU devices, the wrapper splash
  # runs in on a mesh; blockwise stands in for the per-shard kernel here (splash: the slow test).
  from klong_jax.kernels.attention.dispatch import shard_rows
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, w = _qkv(4, 40, 8, 2, jnp.float32)
  seg = _packed(4, 40)
  with jax.set_mesh(mesh):
    for s in (seg, None):
      _assert_matches(lambda q, k, v, s=s: shard_rows(
          lambda *a: blockwise.attention(*a, block_q=16, block_kv=16), q, k, v, s, "data",
          "tensor"), q, k, v, w, s)


@pytest.mark.slow
def test_splash_via_dispatch_under_a_mesh_equals_reference():
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, w = _qkv(2, 130, 4, 2, jnp.float32)
  seg = _packed(2, 130)
  with jax.set_mesh(mesh):
    _assert_matches(lambda q, k, v: kernels.attend(
        q, k, v, segment_ids=seg, impl="splash", block_q=128, block_kv=128, batch_axes="data",
        head_axes="tensor"), q, k, v, w, seg)

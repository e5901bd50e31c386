"""Splash attention (Pallas TPU kernel): causal + segment ids; GQA as one MQA kernel per kv head.

`jax.experimental.pallas.ops.tpu.splash_attention` takes one row [heads, T, H] and has no scale
argument, so q is pre-scaled by H^-0.5 and the kernel is vmapped over batch and kv heads (the G
query heads of a kv head share its K/V, never repeated). Lengths are padded to the block size: the
padded tail comes after every real token, so causality keeps it invisible to them. Off TPU the
kernel runs in Pallas interpret mode (tests only: slow). Under a multi-device mesh, call it inside
`shard_map` (a Pallas call is not partitioned by GSPMD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm


def _kernel(heads: int, length: int, block_q: int, block_kv: int, interpret: bool):
  """The MQA splash kernel for `heads` query heads over one kv head, causal at `length`. Built per
  trace (not cached): its mask tables become constants of the caller's computation."""
  mask = sm.MultiHeadMask([sm.CausalMask((length, length))] * heads)
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              block_q: int = 512, block_kv: int = 512,
              interpret: bool | None = None) -> jax.Array:
  """Causal self-attention within equal segment ids; q [B,T,N,H], k/v [B,T,K,H] (N % K == 0).

  `interpret` defaults to True off TPU. Block sizes must be multiples of 128; they are clamped to
  the length rounded up to 128.
  """
  b, t, n, h = q.shape
  nkv = k.shape[2]
  g = n // nkv
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  length = _round_up(t, 128)  # The kernel's lane width, interpret mode included.
  bq, bk = min(block_q, length), min(block_kv, length)
  length = _round_up(length, max(bq, bk))
  pad = length - t
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  q = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(b, t, nkv, g, h)
  q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)]).transpose(0, 2, 3, 1, 4)  # BKGTH
  k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)  # BKTH
  v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)
  seg = jnp.pad(seg, [(0, 0), (0, pad)])
  kernel = _kernel(g, length, bq, bk, interpret)

  def row(qr, kr, vr, sr):  # qr [K,G,T,H], kr/vr [K,T,H], sr [T]
    ids = sk.SegmentIds(q=sr, kv=sr)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, ids))(qr, kr, vr)

  out = jax.vmap(row)(q, k, v, seg)  # [B,K,G,T,H]
  return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, n, h).astype(v.dtype)

"""cuDNN flash attention on GPU through `jax.nn.dot_product_attention(implementation="cudnn")`.

Causal masking is the kernel's own (`is_causal`, no mask tensor). The public API has no segment
ids: packed rows need a boolean [B,1,T,T] `mask`, which is a T x T buffer (1 byte per entry), so
the dispatcher's "auto" sends packed rows to the blockwise kernel and uses this path only without
segment ids; an explicit `attention_impl="cudnn"` with segment ids takes the mask. cuDNN wants
bf16/fp16 inputs and head_dim a multiple of 8; fp32 inputs are cast to bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              implementation: str = "cudnn") -> jax.Array:
  """Causal self-attention within equal segment ids; q [B,T,N,H], k/v [B,T,K,H] (N % K == 0).

  `implementation="xla"` runs the same call through XLA (how the CPU tests check the masking).
  """
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  dtype = q.dtype
  if implementation == "cudnn" and dtype == jnp.float32:
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                     implementation=implementation)
  return out.astype(dtype)

"""The definition of per-token logprobs from the final hidden state: full fp32 logits, then
log-softmax. What the model's logits path plus `train.losses.token_logprobs` compute today;
the tiled backend is tested against it (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logits(hidden: jax.Array, head: jax.Array, head_layout: str = "dv") -> jax.Array:
  """hidden [..., D] @ head -> fp32 logits [..., V]; head is [D, V] ("dv") or tied [V, D] ("vd").

  Same contraction as `model.layers.Embedder.decode` (inputs in their dtype, fp32 accumulate).
  """
  spec = {"dv": "...d,dv->...v", "vd": "...d,vd->...v"}[head_layout]
  return jnp.einsum(spec, hidden, head, preferred_element_type=jnp.float32)


def token_logprobs_from_hidden(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                               head_layout: str = "dv", temperature: float = 1.0,
                               return_lse: bool = False
                               ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log softmax(hidden @ head / temperature)[target] in fp32, shape of `targets` ([..., T]).

  With `return_lse` also the logsumexp of the tempered logits (same shape).
  """
  z = logits(hidden, head, head_layout).astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  logp = picked - lse
  return (logp, lse) if return_lse else logp

"""Token losses on packed rows: masked next-token cross-entropy, and the shift helpers both the
SFT and the RL losses (`rl/losses.py`) use.

Conventions (packed batch, every array [B, L]): `segment_ids` is 0 on padding and 1.. per chunk;
`loss_mask[t] == 1` marks a token the policy generated, so it is a *target*: the logit at position
t-1 predicts token t, and that prediction counts iff `loss_mask[t]` and t-1, t lie in the same
non-pad segment. `logprobs[t]` (behaviour policy) and `advantages[t]` are aligned with tokens the
same way. All functions are pure; reductions run in float32 whatever the logits dtype. The
`*_from_hidden` forms take the final hidden state and the head instead of logits
(`kernels/vocab`: tiled, without full-vocabulary fp32 logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klong_jax.kernels import vocab


def shift_targets(tokens: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Returns (targets, weights) for logits positions: targets[t] = tokens[t+1].

  weights[t] is 1 only when token t+1 is a loss token of the same (non-pad) segment as t; the
  last position of each row has no target. Losses never cross segment boundaries or touch pads.
  """
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
  valid = same & (loss_mask[:, 1:] > 0)
  weights = jnp.concatenate([valid, jnp.zeros_like(valid[:, :1])], axis=1)
  return targets, weights.astype(jnp.float32)


def shift_aligned(x: jax.Array) -> jax.Array:
  """Moves a per-token array (behaviour logprobs, advantages) to logits positions: out[t]=x[t+1]."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target] per position, in float32. logits [B, L, V], targets [B, L]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - lse


def cross_entropy(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                  loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy, normalised per loss token (sum / count, count >= 1).

  Returns (loss, metrics) with metrics `loss_tokens` (count) and `nll_sum`, so callers can
  re-normalise across micro-batches or hosts exactly.
  """
  targets, weights = shift_targets(tokens, segment_ids, loss_mask)
  return _masked_nll(token_logprobs(logits, targets), weights)


def cross_entropy_from_hidden(hidden: jax.Array, head: tuple[jax.Array, str], tokens: jax.Array,
                              segment_ids: jax.Array, loss_mask: jax.Array, *,
                              vocab_loss: vocab.VocabLoss = vocab.VocabLoss()
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`cross_entropy` from the final hidden [B, L, D] and `head` = (weight, layout) as the model's
  `head()` gives them, by `vocab_loss` (tiled: no [B, L, V] fp32 logits)."""
  targets, weights = shift_targets(tokens, segment_ids, loss_mask)
  logp = vocab.token_logprobs_from_hidden(hidden, head[0], targets, head_layout=head[1],
                                          vocab_loss=vocab_loss)
  return _masked_nll(logp, weights)


def _masked_nll(logp: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  nll = -logp * weights
  count = weights.sum()
  nll_sum = nll.sum()
  loss = nll_sum / jnp.maximum(count, 1.0)
  return loss, {"loss_tokens": count, "nll_sum": nll_sum}

"""Per-row token sampling from logits: temperature, top-k, top-p, greedy, and the logprobs of each.

Pure jittable functions over a batch of rows, each row with its own settings, so one compiled decode
step serves requests with different sampling parameters.

Logprob conventions (all three are computed for every sampled token, `SamplingParams.logprob_mode`
picks the one returned):
  * "tempered" (default): log softmax(logits / T)[token], T = the request's temperature (T = 1
    for greedy). Temperature is applied, top-k/top-p truncation is NOT. This is what a trainer
    recomputes from its own forward pass (log_softmax(logits / T)), so PPO ratios are exact.
  * "raw": log softmax(logits)[token], the untempered model distribution.
  * "processed": log-probability under the distribution actually sampled from, after temperature and
    top-k/top-p renormalization (0.0 for greedy, a point mass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOGPROB_MODES = ("tempered", "raw", "processed")


def filter_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks `scaled` [B, V] to -inf outside each row's top-k and nucleus (top-p) set.

  top_k <= 0 disables top-k; top_p >= 1 disables top-p. The most likely token is always kept; ties
  at the threshold are all kept.
  """
  vocab = scaled.shape[-1]
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  ranks = jnp.arange(vocab)[None, :]
  sorted_k = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_k, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (ranks < k[:, None]) & ((mass_before < top_p[:, None]) | (ranks == 0))
  threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counters: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row -> (tokens [B] int32, logprobs [3, B] f32, LOGPROB_MODES order).

  Rows with temperature <= 0 are greedy (argmax of the raw logits). Randomness is
  fold_in(key(seed), counter) per row, so a request's samples do not depend on its batch mates.
  """
  logits = logits.astype(jnp.float32)
  greedy = temperature <= 0.0
  temp = jnp.where(greedy, 1.0, temperature)[:, None]
  scaled = logits / temp
  needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
  filtered = jax.lax.cond(
      needs_filter, lambda s: filter_logits(s, top_k, top_p), lambda s: s, scaled)
  keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
  drawn = jax.vmap(jax.random.categorical)(keys, filtered)
  tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)

  def pick(lp: jax.Array) -> jax.Array:
    return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]

  tempered = pick(jax.nn.log_softmax(scaled, axis=-1))
  raw = pick(jax.nn.log_softmax(logits, axis=-1))
  processed = jnp.where(greedy, 0.0, pick(jax.nn.log_softmax(filtered, axis=-1)))
  return tokens, jnp.stack([tempered, raw, processed])

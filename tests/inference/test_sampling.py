"""Per-row sampling math: top-k/top-p masks against numpy, greedy, seeds, logprob modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.inference import sampling


def _np_filter(row, k, p):
  order = np.argsort(-row, kind="stable")
  keep = np.zeros(row.shape, bool)
  n = len(row) if k <= 0 else min(k, len(row))
  kept = order[:n]
  probs = np.exp(row[kept] - row[kept].max())
  probs /= probs.sum()
  mass = 0.0
  for idx, pr in zip(kept, probs, strict=True):
    keep[idx] = True
    mass += pr
    if mass >= p:
      break
  return keep


@pytest.mark.parametrize("k,p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (1, 0.3), (100, 0.95)])
def test_filter_matches_numpy(k, p):
  rng = np.random.default_rng(k * 10 + int(p * 10))
  logits = rng.normal(size=(4, 32)).astype(np.float32) * 3
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), jnp.full((4,), k, jnp.int32),
                                          jnp.full((4,), p, jnp.float32)))
  for r in range(4):
    np.testing.assert_array_equal(np.isfinite(out[r]), _np_filter(logits[r], k, p))


def _sample(logits, temp, k, p, seed, counter=0):
  b = logits.shape[0]
  return sampling.sample(jnp.asarray(logits), jnp.full((b,), temp, jnp.float32),
                         jnp.full((b,), k, jnp.int32), jnp.full((b,), p, jnp.float32),
                         jnp.full((b,), seed, jnp.uint32), jnp.full((b,), counter, jnp.int32))


def test_greedy_and_logprob_modes():
  logits = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  toks, lps = _sample(logits, 0.0, 0, 1.0, 0)
  np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
  ref = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), logits.argmax(-1)]
  np.testing.assert_allclose(np.asarray(lps[0]), ref, atol=1e-6)  # tempered, T=1
  np.testing.assert_allclose(np.asarray(lps[1]), ref, atol=1e-6)  # raw
  np.testing.assert_array_equal(np.asarray(lps[2]), 0.0)  # processed: a point mass


def test_tempered_and_processed_logprobs():
  logits = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
  toks, lps = _sample(logits, 0.5, 4, 1.0, 7)
  toks = np.asarray(toks)
  tempered = np.asarray(jax.nn.log_softmax(logits / 0.5))[np.arange(2), toks]
  np.testing.assert_allclose(np.asarray(lps[0]), tempered, atol=1e-5)
  top4 = np.sort(logits / 0.5, -1)[:, -4:]
  processed = (logits / 0.5)[np.arange(2), toks] - np.log(np.exp(top4).sum(-1))
  np.testing.assert_allclose(np.asarray(lps[2]), processed, atol=1e-5)
  assert all(t in np.argsort(-logits[r])[:4] for r, t in enumerate(toks))


def test_seeded_rows_are_independent_of_batch_mates():
  logits = np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32)
  toks, _ = _sample(logits, 1.0, 0, 1.0, 123, 5)
  alone, _ = _sample(logits[2:3], 1.0, 0, 1.0, 123, 5)
  assert int(toks[2]) == int(alone[0])
  again, _ = _sample(logits, 1.0, 0, 1.0, 123, 5)
  np.testing.assert_array_equal(np.asarray(toks), np.asarray(again))


def test_empirical_distribution_matches_top_p():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  rows = np.repeat(logits, 4000, axis=0)
  b = rows.shape[0]
  toks, _ = sampling.sample(jnp.asarray(rows), jnp.ones((b,)), jnp.zeros((b,), jnp.int32),
                            jnp.full((b,), 0.7), jnp.arange(b, dtype=jnp.uint32),
                            jnp.zeros((b,), jnp.int32))
  freq = np.bincount(np.asarray(toks), minlength=4) / b
  # top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalized to 0.625 / 0.375.
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)

"""A request's seed fixes its tokens whatever it is batched with, under the server's own prefill
shapes (padded rows and buckets vary with the wave) and with or without a prefix-cache hit: the
property that makes a seeded RL group (agent/budget.request_seed) reproducible under load."""

import numpy as np
import pytest

from klong_jax.inference.engine import Engine
from klong_jax.inference.prefix_cache import PrefixCache
from klong_jax.inference.sampler import Sampler, SamplingParams

A = list(range(30, 61))              # 31 tokens: 3 full blocks of 8 + 7.
# A 3-token prompt (bucket 16), a 40-token one (bucket 64), a 20-token one (A's bucket 32: a
# 2-row prefill with A), and one sharing A's first 3 blocks.
OTHERS = [[5, 6, 7], list(range(100, 140)), [9] * 20, list(range(30, 54)) + [1, 2]]
SP = SamplingParams(temperature=1.0, max_tokens=12, seed=1234)


@pytest.fixture(scope="module")
def sampler(tiny_model):
  # The server's defaults (serve_config): prefill buckets from 16, as many rows as the wave.
  return Sampler(tiny_model, max_batch=4, max_len=128)


def _run(engine, submits):
  """submits: [(step to submit at, prompt, params)] -> completions in submit order."""
  reqs, step = [None] * len(submits), 0
  while not all(r is not None and r.done for r in reqs):
    for i, (at, prompt, sp) in enumerate(submits):
      if at == step and reqs[i] is None:
        reqs[i] = engine.submit(prompt, sp)
    engine.step()
    step += 1
  return [r.wait() for r in reqs]


@pytest.mark.slow  # ~70 s on 2 busy cores (one compile per prefill shape).
def test_seed_reproduces_tokens_alone_batched_and_cached(sampler):
  solo = _run(Engine(sampler), [(0, A, SP)])[0]
  other = [SamplingParams(temperature=1.0, max_tokens=n, seed=i) for i, n in
           enumerate([3, 20, 7, 11])]
  # In one prefill wave with two others (one in A's bucket: 2 rows), then one joining mid-decode.
  batched = _run(Engine(sampler), [(0, OTHERS[1], other[1]), (0, A, SP), (0, OTHERS[2], other[2]),
                                   (4, OTHERS[0], other[0])])[1]
  # After a request that shares A's first 3 blocks: A prefills only its last 7 tokens.
  engine = Engine(sampler, prefix_cache=PrefixCache(sampler, block_size=8, max_blocks=64))
  cached = _run(engine, [(0, OTHERS[3], other[3]), (3, A, SP)])[1]
  assert engine.stats["prefix_cache_hit_tokens_total"] == 24
  assert cached.cached_tokens == 24
  for got in (batched, cached):
    assert got.token_ids == solo.token_ids
    np.testing.assert_allclose(got.logprobs, solo.logprobs, atol=1e-5)
  # Another seed samples other tokens (the seed is what fixes them).
  reseeded = _run(Engine(sampler), [(0, A, SamplingParams(temperature=1.0, max_tokens=12,
                                                          seed=99))])[0]
  assert reseeded.token_ids != solo.token_ids

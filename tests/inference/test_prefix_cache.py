"""Prefix caching: cached vs uncached engines give the same tokens and logprobs (repeats,
multi-turn extension, a group sharing a prefix, after a weight swap, under eviction)."""

import jax
import numpy as np
import pytest
from flax import nnx

from klong_jax.inference.engine import Engine
from klong_jax.inference.prefix_cache import BlockIndex, PrefixCache, block_keys
from klong_jax.inference.sampler import Sampler, SamplingParams

from .conftest import full_forward_logprobs

FIXED = dict(min_prefill_bucket=64, min_prefill_rows=4)  # One prefill shape: one compile.
BLOCK = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
SAMPLED = SamplingParams(temperature=0.8, max_tokens=6, seed=7)
PROMPT = list(range(30, 60))  # 30 tokens: 3 full blocks + 6.


@pytest.fixture(scope="module")
def sampler(tiny_model):
  return Sampler(tiny_model, max_batch=4, max_len=64, **FIXED)


class Scrambling(Engine):
  """An engine that fills the KV cache with noise before each generate: rows then hold nothing
  a request could reuse by accident (a stale row from an earlier identical prompt would)."""

  def generate(self, prompts, params):
    key = jax.random.key(len(prompts) + self.stats["requests_total"])
    self.sampler.cache = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype),
                                      self.sampler.cache)
    return super().generate(prompts, params)


def cached_engine(sampler, max_blocks=64):
  return Scrambling(sampler, prefix_cache=PrefixCache(sampler, block_size=BLOCK,
                                                      max_blocks=max_blocks))


def assert_same(got, want):
  for g, w in zip(got, want, strict=True):
    assert g.token_ids == w.token_ids
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_block_keys_chain_over_full_blocks():
  a = block_keys(list(range(20)), 8)
  assert len(a) == 2  # The 4-token tail has no key.
  assert block_keys(list(range(16)) + [99], 8) == a
  assert block_keys([1] + list(range(1, 16)), 8)[1] != a[1]  # Block 1's key covers block 0.
  assert block_keys(list(range(20)), 8, salt=1)[0] != a[0]  # Policy version salts the root.


def test_lru_evicts_a_chains_tail_before_its_head():
  index = BlockIndex(3)
  chain = [b"a", b"b", b"c"]
  assert index.insert(chain) == [0, 1, 2]
  assert index.match(chain) == [0, 1, 2]
  index.insert([b"x"])  # Full: evicts the least recently used block, the chain's tail "c".
  assert index.match(chain) == [0, 1] and b"x" in index and index.evictions == 1
  assert index.insert([b"p", b"q", b"r", b"s"]) == [2, 1, 0, None]  # Only 3 fit.
  assert index.match([b"p", b"q", b"r"]) == [2, 1, 0] and b"a" not in index


def test_repeated_prompt_reuses_blocks(sampler):
  plain = Engine(sampler)
  engine = cached_engine(sampler)
  for sp in (GREEDY, SAMPLED):
    want = plain.generate([PROMPT], sp)
    assert_same(engine.generate([PROMPT], sp), want)
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * BLOCK  # Second call only.
  assert engine.stats["prefill_tokens_total"] == 2 * len(PROMPT) - 3 * BLOCK
  assert engine.stats["prompt_tokens_total"] == 2 * len(PROMPT)
  aligned = PROMPT[:32]  # Fully cached but for one token, which must be recomputed.
  want = plain.generate([aligned, aligned], GREEDY)
  hits = engine.stats["prefix_cache_hit_tokens_total"]
  assert_same(engine.generate([aligned], GREEDY) + engine.generate([aligned], GREEDY), want)
  assert engine.stats["prefix_cache_hit_tokens_total"] - hits == 3 * BLOCK + 3 * BLOCK


def test_multi_turn_extension_matches_uncached_and_full_forward(tiny_model, sampler):
  plain, engine = Engine(sampler), cached_engine(sampler)
  history = list(PROMPT)
  for turn in range(3):
    got = engine.generate([history], GREEDY)[0]
    assert_same([got], plain.generate([history], GREEDY))
    argmax, logp = full_forward_logprobs(tiny_model, history, got.token_ids)
    assert got.token_ids == argmax
    assert np.max(np.abs(logp - np.asarray(got.logprobs))) <= 1e-4
    history = history + got.token_ids + [7 + turn, 8, 9]  # Reply + a short tool result.
  # Turn 2 reuses turn 1's 3 blocks (39 tokens -> 4 full blocks stored); turn 3 reuses 4.
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * BLOCK + 4 * BLOCK


def test_group_of_four_shares_the_prefix_in_one_step(sampler):
  shared = list(range(100, 133))  # 33 tokens: 4 full blocks.
  group = [shared + [i, i + 1, i + 2] for i in range(4)]
  sps = [SamplingParams(temperature=1.0, max_tokens=5, seed=i) for i in range(4)]
  want = Engine(sampler).generate(group, sps)
  engine = cached_engine(sampler)
  assert_same(engine.generate(group, sps), want)
  # One member computes the shared blocks; the other three wait one wave and reuse them.
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * 4 * BLOCK
  assert engine.stats["prefill_tokens_total"] == 36 + 3 * 4


def test_weight_swap_invalidates_the_cache(tiny_model, sampler):
  graphdef, params, rest = nnx.split(tiny_model, nnx.Param, ...)
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  own = Sampler(tiny_model, max_batch=4, max_len=64, **FIXED)
  engine = cached_engine(own)
  engine.generate([PROMPT], GREEDY)
  engine.set_params(new_params, version=1)
  got = engine.generate([PROMPT], GREEDY)
  assert engine.stats["prefix_cache_hit_tokens_total"] == 0  # Old-policy KV is never served.
  fresh = Sampler(nnx.merge(graphdef, new_params, rest), max_batch=4, max_len=64, **FIXED)
  want = Engine(fresh).generate([PROMPT], GREEDY)
  assert_same(got, want)
  assert got[0].policy_versions == [1] * GREEDY.max_tokens
  assert_same(engine.generate([PROMPT], GREEDY), want)  # New-policy blocks are reused.
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * BLOCK
  engine.set_params(params, version=1)  # Same version number, other weights: cleared too.
  assert_same(engine.generate([PROMPT], GREEDY), Engine(sampler).generate([PROMPT], GREEDY))
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * BLOCK


def test_tiny_budget_evicts_and_stays_correct(sampler):
  a, b = [1] * 5 + PROMPT[:20], [2] * 5 + PROMPT[:23]  # 3 full blocks each; 3 fit.
  plain, engine = Engine(sampler), cached_engine(sampler, max_blocks=3)
  for p in (a, a, b, a, b, b):  # Hits on the 2nd and 6th call; b and a evict each other.
    assert_same(engine.generate([p], SAMPLED), plain.generate([p], SAMPLED))
  assert engine.stats["prefix_cache_hit_tokens_total"] == 2 * 3 * BLOCK
  assert engine.stats["prefix_cache_evicted_blocks_total"] == 3 * 3
  assert len(engine.prefix_cache.index) <= 3


def test_byte_budget(sampler, tiny_cfg):
  c = tiny_cfg
  per_block = 2 * c.num_layers * BLOCK * c.num_kv_heads * c.head_dim * 4  # k and v, fp32.
  pc = PrefixCache(sampler, block_size=BLOCK, max_bytes=10 * per_block + 1)
  assert pc.bytes_per_block == per_block and pc.num_blocks == 10
  with pytest.raises(ValueError, match="exactly one"):
    PrefixCache(sampler, block_size=BLOCK)


@pytest.mark.slow
def test_sharded_cached_equals_unsharded_uncached(tiny_cfg, sampler):
  """The pool and its copy kernels under a 2x2x2 mesh (KV cache sharded over 8 devices)."""
  import ml_collections  # noqa: PLC0415

  from klong_jax.model.sharded import create_sharded_model  # noqa: PLC0415
  from klong_jax.parallel.mesh import make_mesh  # noqa: PLC0415
  from klong_jax.parallel.rules import LOGICAL_RULES  # noqa: PLC0415
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test sets it)")
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, expert=2, tensor=2)))
  model = create_sharded_model(tiny_cfg, mesh, seed=0)
  sharded = Sampler(model, max_batch=4, max_len=64, mesh=mesh, rules=LOGICAL_RULES, **FIXED)
  assert len(jax.tree.leaves(sharded.cache)[0].sharding.device_set) == 8
  engine = cached_engine(sharded)
  plain = Engine(Sampler(model, max_batch=4, max_len=64, **FIXED))
  group = [PROMPT + [i] for i in range(3)]
  for _ in range(2):  # Cold, then every member reuses the cached blocks.
    assert_same(engine.generate(group, SAMPLED), plain.generate(group, SAMPLED))
  assert engine.stats["prefix_cache_hit_tokens_total"] == 2 * 3 * BLOCK + 3 * 3 * BLOCK

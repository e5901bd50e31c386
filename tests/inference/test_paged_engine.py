"""PagedEngine vs today's dense Engine: the same tokens (logprobs within 1e-5) for greedy and
seeded sampling, with prefix-cache hits (shared pages), chunked prefill of a prompt longer than
the token budget, eviction, stops and the context limit, and a mid-generation weight swap."""

import jax
import numpy as np
import pytest

from klong_jax.inference.engine import ContextLengthError, Engine
from klong_jax.inference.paged.engine import PagedEngine
from klong_jax.inference.sampler import Sampler, SamplingParams

FIXED = dict(min_prefill_bucket=64, min_prefill_rows=4)  # Dense: one prefill shape.
PAGED = dict(page_size=8, token_budget=16, decode_steps=4)  # One set of compiled shapes.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], list(range(20, 45)), [3, 4], [100] * 17]


@pytest.fixture(scope="module")
def dense(tiny_model):
  return Sampler(tiny_model, max_batch=4, max_len=64, **FIXED)


@pytest.fixture(scope="module")
def paged(tiny_model):
  return Sampler(tiny_model, max_batch=4, max_len=64, dense_cache=False)


def assert_same(got, want, routing=False):
  for g, w in zip(got, want, strict=True):
    assert g.token_ids == w.token_ids
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    assert g.policy_versions == w.policy_versions and g.finish_reason == w.finish_reason
    assert [[i for i, _ in t] for t in g.top_logprobs] == [[i for i, _ in t]
                                                          for t in w.top_logprobs]
    if routing:
      np.testing.assert_array_equal(g.routing, w.routing)


def assert_no_leak(engine):
  """Every page is back: free or cached-unreferenced; no reservation left."""
  assert engine._reserved == 0 and not engine._order and not engine._claimed
  assert sum(engine.alloc.refs) == 0
  assert engine.alloc.available == engine.alloc.num_pages - 1


@pytest.mark.slow  # Compiles both engines' shapes (later tests reuse them).
def test_greedy_and_seeded_sampling_match_dense(dense, paged):
  """The 25-token prompt is prefilled in two chunks (budget 16 minus decoding rows)."""
  for sp in (SamplingParams(temperature=0.0, max_tokens=12, top_logprobs=3, return_routing=True),
             SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=16, seed=3,
                            top_logprobs=2, return_routing=True)):
    engine = PagedEngine(paged, **PAGED)
    got = engine.generate(PROMPTS, sp)
    assert_same(got, Engine(dense).generate(PROMPTS, sp), routing=True)
    assert engine.stats["device_calls_total"] < engine.stats["decode_steps_total"]  # k per call.
    assert_no_leak(engine)


def test_prefix_hits_share_pages_and_match_dense(dense, paged):
  prefix = list(range(40, 64))  # 3 full pages.
  group = [prefix + [i, i + 1, i + 2] for i in range(4)]
  sp = [SamplingParams(temperature=1.0, max_tokens=6, seed=i) for i in range(4)]
  engine = PagedEngine(paged, **PAGED)
  first = engine.generate(group, sp)
  assert engine.stats["prefix_cache_hit_tokens_total"] == 3 * 24  # Members 2-4 reuse member 1's.
  reqs = [engine.submit(p, s) for p, s in zip(group, sp, strict=True)]
  engine.step()
  shared = reqs[0].pages[:3]
  assert all(r.pages[:3] == shared for r in reqs)  # Same pages, no copies...
  assert all(engine.alloc.refs[p] == 4 for p in shared)  # ...referenced once per request.
  while not all(r.done for r in reqs):
    engine.step()
  want = Engine(dense).generate(group, sp)
  assert_same(first, want)
  assert_same([r.wait() for r in reqs], want)
  assert_no_leak(engine)


def test_chunked_prefill_never_stalls_decoding(dense, paged):
  sp = SamplingParams(temperature=0.0, max_tokens=30)
  long = list(range(100, 150))  # 50 tokens: 4 chunks within the 16-token budget.
  engine = PagedEngine(paged, **PAGED)
  short = engine.submit([7, 8, 9], sp)
  engine.step()
  assert len(short.token_ids) == 1
  big = engine.submit(long, SamplingParams(temperature=0.5, max_tokens=5, seed=1))
  steps = 0
  while not big.token_ids:
    before = len(short.token_ids)
    engine.step()
    steps += 1
    assert len(short.token_ids) == before + 1  # The decoding row got its token every step.
  assert steps == 4
  while not (short.done and big.done):
    engine.step()
  want = Engine(dense).generate([[7, 8, 9], long], [sp, big.params])
  assert_same([short.wait(), big.wait()], want)
  assert_no_leak(engine)


def test_eviction_reuses_pages_and_matches_dense(dense, paged):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, 500, 30).tolist() for _ in range(12)]
  sp = SamplingParams(temperature=0.9, max_tokens=6, seed=11)
  engine = PagedEngine(paged, **PAGED)  # 33 pages: 12 prompts x 3 cached pages do not fit.
  got = engine.generate(prompts, sp) + engine.generate(prompts[:2], sp)
  assert engine.stats["prefix_cache_evicted_blocks_total"] > 0
  assert engine.stats["prefix_cache_hit_tokens_total"] == 0  # The first prompts were evicted.
  assert_same(got, Engine(dense).generate(prompts + prompts[:2], sp))
  assert_no_leak(engine)


def test_stops_and_context_limit_match_dense(dense, paged):
  greedy = SamplingParams(temperature=0.0, max_tokens=10)
  ref = Engine(dense).generate([PROMPTS[1]], greedy)[0].token_ids
  stop = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(ref[5],))
  near_end = SamplingParams(temperature=1.0, seed=2)  # No max_tokens: runs to max_len.
  prompts, sps = [PROMPTS[1], list(range(1, 59))], [stop, near_end]
  engine = PagedEngine(paged, **PAGED)
  got = engine.generate(prompts, sps)
  assert got[0].finish_reason == "stop" and got[1].finish_reason == "length"
  assert len(got[1].token_ids) == 64 - 58
  assert_same(got, Engine(dense).generate(prompts, sps))
  assert_no_leak(engine)


def _run_with_swap(engine, prompt, sp, swap_at, params):
  req = engine.submit(prompt, sp)
  while len(req.token_ids) < swap_at:
    engine.step()
  assert len(req.token_ids) == swap_at
  engine.set_params(params, 1)
  while not req.done:
    engine.step()
  return req.wait()


def test_mid_generation_weight_swap_matches_dense(dense, paged):
  """Both engines swap after 5 tokens (dense: prefill + 4 decode steps; paged: prefill + one
  4-step call); every token carries the version that produced it."""
  old_d, old_p = dense.params, paged.params
  new = jax.tree.map(lambda x: x * 1.1, old_d)
  sp = SamplingParams(temperature=0.8, max_tokens=12, seed=5)
  try:
    want = _run_with_swap(Engine(dense), PROMPTS[2], sp, 5, new)
    got = _run_with_swap(PagedEngine(paged, **PAGED), PROMPTS[2], sp, 5, new)
  finally:
    dense.load_params(old_d, 0)
    paged.load_params(old_p, 0)
  assert got.policy_versions == [0] * 5 + [1] * 7
  assert_same([got], [want])


def test_replica_seeds_differ_and_explicit_seeds_reproduce(paged):
  a = PagedEngine(paged, replica_id=1, **PAGED)
  b = PagedEngine(paged, replica_id=2, **PAGED)
  drawn = SamplingParams(temperature=1.0, max_tokens=4)
  assert a.submit([1, 2], drawn).seed != b.submit([1, 2], drawn).seed
  seeded = SamplingParams(temperature=1.0, max_tokens=6, seed=9)
  assert a.generate([[4, 5, 6]], seeded)[0].token_ids == b.generate([[4, 5, 6]],
                                                                    seeded)[0].token_ids


def test_bad_configs_name_the_fix(paged):
  with pytest.raises(ValueError, match="token_budget"):
    PagedEngine(paged, page_size=8, token_budget=2)
  small = PagedEngine(paged, page_size=8, num_pages=4)  # 3 pages: 24 positions.
  with pytest.raises(ContextLengthError, match="kv_pages"):
    small.submit(list(range(20)), SamplingParams(max_tokens=8))
  small.submit(list(range(20)), SamplingParams(max_tokens=5))


@pytest.mark.slow
def test_server_serves_the_paged_engine(paged, dense, tok, chat_format):
  """The OpenAI server over a PagedEngine (precompiled in its thread at start): the same greedy
  tokens as the dense engine, streamed and not."""
  import openai

  from klong_jax.inference.server import Running, Server

  engine = PagedEngine(paged, tok, stop_token_ids=chat_format.stop_token_ids, **PAGED)
  engine.precompile_on_start = True
  running = Running(Server(engine, tok, chat_format, model_name="klong-tiny"))
  try:
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "plan"}]
    resp = client.chat.completions.create(model="klong-tiny", messages=msgs, temperature=0,
                                          max_tokens=8)
    ids = resp.choices[0].model_extra["token_ids"]
    stream = client.chat.completions.create(model="klong-tiny", messages=msgs, temperature=0,
                                            max_tokens=8, stream=True)
    streamed = [t for c in stream if c.choices
                for t in (c.choices[0].model_extra.get("token_ids") or [])]
  finally:
    running.stop()
  want = Engine(dense, stop_token_ids=chat_format.stop_token_ids).generate(
      [chat_format.render_prompt(msgs)], SamplingParams(temperature=0, max_tokens=8))[0]
  assert ids == streamed == want.token_ids
  assert engine.stats["device_calls_total"] > 0 and engine.precompile_on_start is False

"""Sampler + engine: greedy == full-forward argmax, logprob agreement, batching, stops."""

import jax
import numpy as np
import pytest
from flax import nnx

from klong_jax.inference.engine import ContextLengthError, Engine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES

from .conftest import full_forward_logprobs

FIXED = dict(min_prefill_bucket=64, min_prefill_rows=4)  # One prefill shape: one compile.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], list(range(20, 45)), [3, 4], [100] * 17]


@pytest.fixture(scope="module")
def sampler(tiny_model):
  return Sampler(tiny_model, max_batch=4, max_len=64, **FIXED)


@pytest.mark.slow
def test_greedy_equals_full_forward_argmax(tiny_model, sampler):
  out = Engine(sampler).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
  for p, c in zip(PROMPTS, out, strict=True):
    argmax, logp = full_forward_logprobs(tiny_model, p, c.token_ids)
    assert c.token_ids == argmax
    assert np.max(np.abs(logp - np.asarray(c.logprobs))) <= 1e-4
    assert c.finish_reason == "length" and len(c.token_ids) == 12
    assert c.policy_versions == [0] * 12


def test_sampled_logprobs_agree_with_trainer_forward(tiny_model, sampler):
  sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=16, seed=3)
  out = Engine(sampler).generate(PROMPTS, sp)
  for p, c in zip(PROMPTS, out, strict=True):
    _, logp = full_forward_logprobs(tiny_model, p, c.token_ids, temperature=0.7)
    assert np.max(np.abs(logp - np.asarray(c.logprobs))) <= 1e-4


def test_continuous_batching_matches_solo_runs(sampler):
  """Requests joining and leaving a running batch give the same tokens as each run alone."""
  sps = [SamplingParams(temperature=1.0, max_tokens=n, seed=i) for i, n in
         enumerate([3, 20, 7, 11, 5])]
  solo = [Engine(sampler).generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, sps,
                                                                           strict=True)]
  engine = Engine(sampler)
  reqs = [engine.submit(PROMPTS[0], sps[0]), engine.submit(PROMPTS[1], sps[1])]
  for _ in range(3):
    engine.step()
  reqs += [engine.submit(p, sp) for p, sp in zip(PROMPTS[2:], sps[2:], strict=True)]
  steps = 3
  while not all(r.done for r in reqs):
    engine.step()
    steps += 1
  assert [r.wait().token_ids for r in reqs] == solo
  static = Engine(sampler, schedule="static").generate(PROMPTS, sps)
  assert [c.token_ids for c in static] == solo
  assert steps < 20 + 8  # The long request did not wait for a whole static batch.


def test_stops_and_limits(tok, sampler):
  greedy = SamplingParams(temperature=0.0, max_tokens=10)
  ref = Engine(sampler).generate([PROMPTS[1]], greedy)[0].token_ids
  stop_id = ref[4]
  first = ref.index(stop_id)
  c = Engine(sampler).generate([PROMPTS[1]], SamplingParams(
      temperature=0.0, max_tokens=10, stop_token_ids=(stop_id,)))[0]
  assert c.token_ids == ref[:first + 1] and c.finish_reason == "stop"  # Stop id included.
  engine = Engine(sampler, tok)
  full = engine.generate([PROMPTS[1]], greedy)[0]
  assert full.text == tok.decode(full.token_ids)
  stop = full.text[3:6]
  c = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=10,
                                                   stop=(stop,)))[0]
  assert c.finish_reason == "stop" and c.text == full.text[:full.text.index(stop)]
  assert c.token_ids == full.token_ids[:len(c.token_ids)]
  assert engine.generate([[1, 2]], SamplingParams(max_tokens=0))[0].token_ids == []
  with pytest.raises(ContextLengthError, match="maximum context length is 64"):
    engine.submit(list(range(60)), SamplingParams(max_tokens=10))
  c = engine.generate([list(range(1, 60))], SamplingParams(temperature=0.0))[0]
  assert c.finish_reason == "length" and len(c.token_ids) == 5  # Filled the context.


@pytest.mark.slow
def test_weight_swap_between_steps(tiny_model):
  graphdef, params, rest = nnx.split(tiny_model, nnx.Param, ...)
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  other = nnx.merge(graphdef, new_params, rest)
  sampler = Sampler(tiny_model, max_batch=4, max_len=64, **FIXED)
  engine = Engine(sampler)
  req = engine.submit(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))
  for _ in range(3):
    engine.step()
  engine.set_params(new_params, version=5)
  while not req.done:
    engine.step()
  c = req.wait()
  assert c.policy_versions == [0] * 4 + [5] * 4
  after = Engine(sampler).generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=6))
  argmax, _ = full_forward_logprobs(other, PROMPTS[0], after[0].token_ids)
  assert after[0].token_ids == argmax and after[0].policy_versions == [5] * 6


@pytest.mark.slow
def test_sharded_equals_unsharded(tiny_cfg, tiny_model, sampler):
  import ml_collections
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, expert=2, tensor=2)))
  model = create_sharded_model(tiny_cfg, mesh, seed=0)
  sharded = Sampler(model, max_batch=4, max_len=64, mesh=mesh, rules=LOGICAL_RULES, **FIXED)
  assert len(jax.tree.leaves(sharded.cache)[0].sharding.device_set) == 8
  sp = SamplingParams(temperature=0.8, max_tokens=10, seed=11)
  a = Engine(sharded).generate(PROMPTS, sp)
  b = Engine(Sampler(model, max_batch=4, max_len=64, **FIXED)).generate(PROMPTS, sp)
  for x, y in zip(a, b, strict=True):
    assert x.token_ids == y.token_ids
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)

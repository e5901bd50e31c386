"""Routing replay (R3) end to end in JAX: the sampler records the expert ids of every token and a
trainer forward replaying them reproduces the sampler's logprobs, even after the selection-only
expert bias moved; with a perturbed router, replay pins the selection to the sampler's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.inference.engine import Engine
from klong_jax.inference.prefix_cache import PrefixCache
from klong_jax.inference.sampler import Sampler, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 45)), [100] * 17]
PAD = 64


@nnx.jit
def _forward(model, tokens, routing):
  logits, aux = model(tokens, jnp.arange(tokens.shape[1])[None], routing=routing)
  return logits, aux["moe_routing"]


def trainer_logprobs(model, prompt, generated, routing=None):
  """(logprobs of `generated`, expert ids used [P+C, L, k]) from one full forward pass,
  replaying `routing` [P+C, L, k] (-1 = own top-k) when given."""
  ids = list(prompt) + list(generated)
  tokens = np.zeros((1, PAD), np.int32)
  tokens[0, :len(ids)] = ids
  cfg = model.cfg
  rr = np.full((1, PAD, cfg.num_moe_layers, cfg.num_experts_per_tok), -1, np.int32)
  if routing is not None:
    rr[0, :len(ids)] = routing
  logits, used = _forward(model, jnp.asarray(tokens), jnp.asarray(rr))
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  p = len(prompt)
  out = np.asarray(logp[p - 1:len(ids) - 1])[np.arange(len(generated)), generated]
  return out, np.asarray(used[0, :len(ids)])


@pytest.fixture(scope="module")
def sampled(tiny_model):
  sampler = Sampler(tiny_model, max_batch=4, max_len=PAD, min_prefill_bucket=32,
                    min_prefill_rows=4)
  sp = SamplingParams(temperature=1.0, max_tokens=16, seed=7, return_routing=True)
  return Engine(sampler).generate(PROMPTS, sp)


def _variant(model, fn):
  out = nnx.clone(model)
  fn(out.moe_layers.mlp)
  return out


def test_sampler_records_every_fed_token(tiny_cfg, sampled):
  for p, c in zip(PROMPTS, sampled, strict=True):
    n = len(p) + len(c.token_ids)
    assert c.routing.shape == (n, tiny_cfg.num_moe_layers, tiny_cfg.num_experts_per_tok)
    assert c.routing.dtype == np.int16
    assert (c.routing[:-1] >= 0).all()  # The last token was never fed back: not recorded.
    assert (c.routing[-1] == -1).all()
    assert (c.routing[:-1] < tiny_cfg.num_experts).all()


def test_replay_reproduces_sampler_logprobs_exactly(tiny_model, sampled):
  for p, c in zip(PROMPTS, sampled, strict=True):
    logp, used = trainer_logprobs(tiny_model, p, c.token_ids, c.routing)
    np.testing.assert_allclose(logp, c.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(used[:-1], c.routing[:-1])


def test_replay_is_exact_after_the_selection_bias_moved(tiny_cfg, tiny_model, sampled):
  """The aux-free balancing step changes the expert bias between sampling and training: the
  trainer's own top-k flips, the replayed selection (and so the logprobs) does not."""
  e = tiny_cfg.num_experts
  shift = np.where(np.arange(e) % 2 == 0, 0.05, -0.05).astype(np.float32)

  def move_bias(mlp):
    mlp.expert_bias_e.value = mlp.expert_bias_e.value + jnp.asarray(shift)

  trainer = _variant(tiny_model, move_bias)
  flips, errs_off = 0, []
  for p, c in zip(PROMPTS, sampled, strict=True):
    off, used_off = trainer_logprobs(trainer, p, c.token_ids)
    flips += int(np.any(used_off[:-1] != c.routing[:-1], axis=(1, 2)).sum())
    errs_off.append(np.abs(off - c.logprobs).max())
    on, used_on = trainer_logprobs(trainer, p, c.token_ids, c.routing)
    np.testing.assert_array_equal(used_on[:-1], c.routing[:-1])
    np.testing.assert_allclose(on, c.logprobs, atol=1e-5, rtol=0)
  assert flips > 0 and max(errs_off) > 1e-3  # Without replay the routing did differ.


def test_replay_pins_selection_under_a_perturbed_router(tiny_model, sampled):
  def perturb(mlp):
    w = mlp.router_de.value
    mlp.router_de.value = w + jax.random.normal(jax.random.key(3), w.shape) * 0.01

  trainer = _variant(tiny_model, perturb)
  flips, err_on, err_off = 0, [], []
  for p, c in zip(PROMPTS, sampled, strict=True):
    off, used_off = trainer_logprobs(trainer, p, c.token_ids)
    on, used_on = trainer_logprobs(trainer, p, c.token_ids, c.routing)
    flips += int(np.any(used_off[:-1] != c.routing[:-1], axis=(1, 2)).sum())
    np.testing.assert_array_equal(used_on[:-1], c.routing[:-1])
    err_on.append(np.abs(on - c.logprobs))
    err_off.append(np.abs(off - c.logprobs))
  assert flips > 0
  assert np.concatenate(err_on).mean() < np.concatenate(err_off).mean()


def test_prefix_cache_hits_keep_their_routing(tiny_model):
  sampler = Sampler(tiny_model, max_batch=2, max_len=PAD, min_prefill_bucket=32)
  engine = Engine(sampler, prefix_cache=PrefixCache(sampler, block_size=8, max_blocks=16))
  shared = list(range(30, 50))
  sp = SamplingParams(temperature=0.0, max_tokens=4, return_routing=True)
  first = engine.generate([shared + [1, 2]], sp)[0]
  second = engine.generate([shared + [3]], sp)[0]
  assert engine.stats["prefix_cache_hit_tokens_total"] >= 16
  assert (second.routing[:len(shared) + 1] >= 0).all()
  np.testing.assert_array_equal(second.routing[:16], first.routing[:16])
  logp, _ = trainer_logprobs(tiny_model, shared + [3], second.token_ids, second.routing)
  np.testing.assert_allclose(logp, second.logprobs, atol=1e-5, rtol=0)

"""The paged engine on a serving mesh (data 2 x expert 2 x tensor 2, SERVING_RULES; data 4 x
tensor 2, SERVING_EXPERTS_OVER_TENSOR_RULES; 8 fake CPU devices): its page pool is split over kv
heads by the rules (each head's k and v on one chip, pages on every chip), and it generates the
unsharded engine's tokens (logprobs within 1e-5), through chunked prefill, a prefix-cache hit
and multi-step decode calls."""

import jax
import ml_collections
import numpy as np
import pytest

from klong_jax.inference.paged.engine import PagedEngine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel import rules as rules_lib
from klong_jax.parallel.mesh import make_mesh

PAGED = dict(page_size=8, token_budget=16, decode_steps=4)


def _mesh(**axes):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return make_mesh(ml_collections.ConfigDict(axes or dict(data=2, fsdp=1, expert=2, tensor=2)))


# (rules, mesh): SERVING_RULES (experts over `expert`, their hidden over `tensor`); the v6e-8
# table (whole experts over `tensor`, tokens replicated over it: each chip runs its experts on
# every token of its data shard, a psum over `tensor` sums them).
LAYOUTS = {"serving": (rules_lib.SERVING_RULES, dict(data=2, fsdp=1, expert=2, tensor=2)),
           "experts_over_tensor": (rules_lib.SERVING_EXPERTS_OVER_TENSOR_RULES,
                                   dict(data=4, fsdp=1, expert=1, tensor=2))}


def test_pool_spec_keeps_each_heads_k_and_v_on_one_chip():
  mesh = _mesh()
  shape = (6, 4, 2 * 4, 2)  # 4 kv heads, interleaved k0 v0 k1 v1 ...
  sharding = rules_lib.paged_pool_sharding(mesh, rules_lib.SERVING_RULES, shape)
  assert sharding.spec == jax.P(None, None, "tensor", None)
  # Entry 2j + c holds head j, c = 0 (k) / 1 (v): every shard holds whole (k, v) pairs.
  tag = np.broadcast_to(np.arange(8, dtype=np.float32)[None, None, :, None], shape)
  for shard in jax.device_put(tag, sharding).addressable_shards:
    got = np.asarray(shard.data)[0, 0, :, 0].astype(int)
    assert len(got) == 4 and list(got[0::2] + 1) == list(got[1::2])
  # kv heads the tensor axis does not divide: replicated; pages mapped to an axis: refused.
  odd = rules_lib.paged_pool_spec({"tensor": 2}, rules_lib.SERVING_RULES, (6, 4, 2 * 3, 2))
  assert odd == jax.P(None, None, None, None)
  bad = tuple((n, "expert" if n == "cache_pages" else v) for n, v in rules_lib.SERVING_RULES)
  with pytest.raises(ValueError, match="cache_pages"):
    rules_lib.paged_pool_spec({"expert": 2}, bad, shape)


@pytest.mark.slow  # Compiles the mixed and decode steps twice (mesh, single device): ~40 s.
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_paged_engine_matches_unsharded(tiny_cfg, layout):
  rules, axes = LAYOUTS[layout]
  mesh = _mesh(**axes)
  model = create_sharded_model(tiny_cfg, mesh, seed=0, rules=rules)
  # Expert stacks [layers, experts, model, hidden]: experts on the rules' axis, hidden likewise.
  spec = (*model.moe_layers.mlp.gate_edf[...].sharding.spec, None, None, None, None)
  assert (spec[1], spec[3]) == (dict(rules)["expert"], dict(rules)["expert_mlp"]), spec
  sharded = Sampler(model, max_batch=4, max_len=64, mesh=mesh, rules=rules, dense_cache=False)
  single = Sampler(model, max_batch=4, max_len=64, dense_cache=False)
  prefix = list(range(40, 64))  # 3 full pages: the second wave hits them.
  first = [list(range(20, 45)), prefix + [1, 2], [5, 6, 7]]  # 25 tokens: chunked (budget 16).
  second = [prefix + [3, 4, 5], [8, 9, 10, 11]]
  sps = [SamplingParams(temperature=0.0, max_tokens=10, top_logprobs=2),
         SamplingParams(temperature=0.8, top_p=0.9, max_tokens=9, seed=4),
         SamplingParams(temperature=0.0, max_tokens=7)]
  runs = []
  for sampler in (sharded, single):
    engine = PagedEngine(sampler, **PAGED)
    out = engine.generate(first, sps) + engine.generate(second, sps[:2])
    runs.append((engine, out))
  (eng, got), (ref, want) = runs
  spec = eng.pool.sharding.spec
  assert spec[2] == "tensor" and all(a is None for i, a in enumerate(spec) if i != 2)
  assert eng.pool.addressable_shards[0].data.shape[2] == tiny_cfg.num_kv_heads  # 2K / 2.
  assert len(eng.pool.sharding.device_set) == 8
  assert eng.stats["prefix_cache_hit_tokens_total"] == 24
  assert eng.stats["device_calls_total"] < eng.stats["decode_steps_total"]  # k steps a call.
  assert eng.stats == ref.stats
  for g, w in zip(got, want, strict=True):
    assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    assert [[i for i, _ in t] for t in g.top_logprobs] == [[i for i, _ in t]
                                                          for t in w.top_logprobs]
  # Same K/V in the same pages: the sharded pool, gathered, is the unsharded one.
  np.testing.assert_allclose(np.asarray(eng.pool), np.asarray(ref.pool), atol=1e-5)
  # The pool stays on its sharding across steps (no silent re-layout by the jitted calls).
  assert eng.pool.sharding.spec == spec

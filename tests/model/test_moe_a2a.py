"""All-to-all MoE dispatch == the all-gather dispatch == the dense reference (forward + gradient)
on 8 fake CPU devices, and MoE statistics that ignore padding tokens."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.model import moe_a2a, moe_dispatch, moe_router
from klong_jax.model.config import ConfigError, get_preset
from klong_jax.model.moe import MoE, routed_experts
from klong_jax.model.sharded import create_sharded_model
from klong_jax.model.transformer import Transformer
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES

N, D, F, E, K = 64, 16, 8, 8, 2
# Every sharding path: tokens over expert only; expert x fsdp (independent exchange groups per
# fsdp shard); expert x data x tensor (expert hidden dim sharded, psum over tensor). The first is
# the fast lane's, the others take > 10 s each on 2 shared cores.
MESHES = [{"expert": 8},
          pytest.param({"expert": 4, "fsdp": 2}, marks=pytest.mark.slow, id="expert4xfsdp2"),
          pytest.param({"expert": 2, "data": 2, "tensor": 2}, marks=pytest.mark.slow,
                       id="expert2xdata2xtensor2")]
# Exchanges tested on CPU: the padded all_to_all, and the ragged path's offsets through an
# all_gather emulation of ragged_all_to_all (XLA:CPU has no ragged-all-to-all).
EXCHANGES = {"padded": ("padded", None),
             "ragged": ("ragged", moe_a2a.emulated_ragged_all_to_all)}


def _inputs(seed=0, skew=False):
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (N, D))
  _, idx = jax.lax.top_k(jax.random.normal(keys[1], (N, E)), K)
  if skew:  # Every copy of every token to expert 0: one device receives all (worst case).
    idx = jnp.zeros((N, K), jnp.int32)
  w = jax.random.uniform(keys[2], (N, K))
  wg = jax.random.normal(keys[3], (E, D, F)) / 4
  wu = jax.random.normal(keys[4], (E, D, F)) / 4
  wd = jax.random.normal(keys[5], (E, F, D)) / 4
  return x, idx.astype(jnp.int32), w, wg, wu, wd


@functools.cache
def _dense(skew):
  return _value_and_grad(moe_dispatch.dense_reference, _inputs(skew=skew))


def _value_and_grad(fn, args):
  """(output, grads wrt x, w, wg, wu, wd) of sum(sin(fn)) so every output element matters."""
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))
  return jax.jit(fn)(*args), jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5)))(*args)


def _assert_same(got, want, atol=1e-5):
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol)


def _routed(dispatch, exchange="auto", ragged_fn=None, impl="blocked"):
  return lambda *a: routed_experts(*a, impl=impl, block_size=4, dispatch=dispatch,
                                   exchange=exchange, ragged_fn=ragged_fn)[0]


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("exchange", sorted(EXCHANGES))
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(f"{a}{n}" for a, n in s.items()))
def test_a2a_equals_dense_and_allgather(sizes, exchange, skew):
  args = _inputs(skew=skew)
  want = _dense(skew)
  mesh = make_mesh(sizes)
  with jax.set_mesh(mesh):
    a2a = _value_and_grad(_routed("a2a", *EXCHANGES[exchange]), args)
    gathered = _value_and_grad(_routed("allgather"), args)
  _assert_same(a2a, want)
  _assert_same(a2a, gathered)


@pytest.mark.slow
def test_a2a_with_expert_axes_that_do_not_shard_tokens():
  """Experts over (expert, data), tokens over (fsdp, expert): `data` is a `rest` axis (same
  tokens on both of its devices; each keeps its own experts' copies, then psum)."""
  rules = tuple((name, ("expert", "data") if name == "expert" else
                 ("fsdp", "expert") if name == "act_batch" else value)
                for name, value in LOGICAL_RULES)
  args = _inputs(seed=2)
  want = _value_and_grad(moe_dispatch.dense_reference, args)
  with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "expert": 2})), \
       nnx.logical_axis_rules(rules):
    for exchange, ragged_fn in EXCHANGES.values():
      _assert_same(_value_and_grad(_routed("a2a", exchange, ragged_fn), args), want)


@pytest.mark.parametrize("impl", ["dense", "ragged", "gmm"])
def test_a2a_local_compute_impls(impl):
  """The received rows go through any dropless local compute (gmm: Pallas interpret mode)."""
  args = _inputs(seed=3)
  with jax.set_mesh(make_mesh({"expert": 4, "fsdp": 2})):
    got = jax.jit(_routed("a2a", "padded", impl=impl))(*args)
  np.testing.assert_allclose(got, moe_dispatch.dense_reference(*args), atol=1e-5)


def test_a2a_receive_buffer_is_worst_case():
  """Skewed routing fills one device's receive buffer exactly (G * n rows: every token of the
  exchange group): the padded exchange's buffers are sized for it, nothing is dropped."""
  args = _inputs(skew=True)
  with jax.set_mesh(make_mesh({"expert": 4, "fsdp": 2})):
    text = jax.jit(_routed("a2a", "padded")).lower(*args).as_text()
    reference = jax.jit(_routed("allgather")).lower(*args).as_text()
  # Exchange group G=4, n = 64/8 tokens per device -> [4, 8, D] blocks.
  assert "all_to_all" in text and f"tensor<4x8x{D}xf32>" in text
  assert "all_gather" not in text and "all_gather" in reference  # Tokens are not gathered.


def _tiny(**changes):
  return dataclasses.replace(get_preset("tiny"), **changes).validate()


@pytest.mark.slow
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_moe_layer_dispatch_modes_agree_with_replay(score):
  cfg = _tiny(router_score=score, router_bias=score == "sigmoid", moe_impl="blocked",
              moe_block_size=4)
  x = jax.random.normal(jax.random.key(3), (8, 8, cfg.hidden_size))
  replay = jax.random.randint(jax.random.key(4), (8, 8, 1), 0, cfg.num_experts)
  replay = jnp.concatenate([replay, (replay + 3) % cfg.num_experts], axis=-1)
  replay = replay.at[0].set(-1)  # Row 0 unrecorded: its own top-k.
  mesh = make_mesh({"expert": 4, "fsdp": 2})
  outs = {}
  for dispatch in ("allgather", "a2a"):
    layer = MoE(dataclasses.replace(cfg, moe_dispatch=dispatch), rngs=nnx.Rngs(0))

    def loss(m, x):
      y, aux = m(x, replay)
      return jnp.sum(jnp.sin(y)), (y, aux["moe_routing"])

    with jax.set_mesh(mesh):
      grads, (y, ids) = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
    outs[dispatch] = (y, ids, nnx.state(grads[0], nnx.Param), grads[1])
  np.testing.assert_array_equal(outs["a2a"][1][1:], replay[1:])
  _assert_same(outs["a2a"], outs["allgather"])


@pytest.mark.slow
def test_transformer_logits_and_grads_equal_between_dispatches():
  cfg = _tiny(moe_impl="blocked", moe_block_size=4, num_layers=3)
  mesh = make_mesh({"expert": 4, "fsdp": 2})
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8), (8, 8))
  outs = {}
  for dispatch in ("allgather", "a2a"):
    model = create_sharded_model(dataclasses.replace(cfg, moe_dispatch=dispatch), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, graphdef=graphdef, rest=rest):
      logits, _ = nnx.merge(graphdef, p, rest)(tokens, positions)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    with jax.set_mesh(mesh):
      outs[dispatch] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  _assert_same(outs["a2a"], outs["allgather"], atol=2e-5)


def test_auto_dispatch_and_config_validation():
  assert _tiny().moe_dispatch == "auto"
  with pytest.raises(ConfigError, match="moe_dispatch"):
    _tiny(moe_dispatch="ring")
  with pytest.raises(ConfigError, match="moe_dispatch"):
    _tiny(moe_dispatch="a2a", moe_impl="capacity")
  x, idx, w, wg, wu, wd = _inputs()
  with jax.set_mesh(make_mesh({"expert": 8})):
    auto = jax.jit(_routed("auto")).lower(x, idx, w, wg, wu, wd).as_text()
  assert "all_to_all" in auto


# MoE statistics over real tokens only.

def _padded_batch(cfg, seed, pad):
  """The same 2 rows of 10 real tokens (two packed segments) + `pad` garbage tokens (segment 0)."""
  real = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size)  # Same in every batch.
  garbage = jax.random.randint(jax.random.key(seed), (2, pad), 0, cfg.vocab_size)
  tokens = jnp.concatenate([real, garbage], axis=1)
  seg = jnp.concatenate([jnp.full((2, 6), 1), jnp.full((2, 4), 2), jnp.zeros((2, pad), int)], 1)
  pos = jnp.concatenate([jnp.arange(6), jnp.arange(4), jnp.arange(pad)])
  return tokens, jnp.broadcast_to(pos, tokens.shape), seg


@pytest.mark.slow
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_stats_ignore_padding(score):
  cfg = _tiny(router_score=score, router_bias=score == "sigmoid", moe_impl="dense")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  run = nnx.jit(lambda m, t, p, s: m(t, p, s)[1])
  base = run(model, *_padded_batch(cfg, 0, 0))
  for seed, pad in ((1, 6), (2, 6), (3, 14)):
    aux = run(model, *_padded_batch(cfg, seed, pad))
    for name in ("moe_lb_loss", "router_z_loss", "moe_expert_load"):
      np.testing.assert_allclose(aux[name], base[name], rtol=1e-5, atol=1e-7, err_msg=name)
  # Without the mask the garbage does count (the test can fail).
  unmasked = run(model, *_padded_batch(cfg, 1, 6)[:2], None)
  assert not np.allclose(unmasked["moe_expert_load"], base["moe_expert_load"])
  load = np.asarray(base["moe_expert_load"])
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  bias = moe_router.update_expert_bias(jnp.zeros_like(load), base["moe_expert_load"], 0.1)
  assert np.isfinite(np.asarray(bias)).all()


def test_drop_rate_counts_real_tokens_only():
  """Capacity path: padding takes no expert slots and is not counted; the rate is the real
  copies' drop share whatever the padding holds, and matches a numpy count."""
  cfg = _tiny(moe_impl="capacity", capacity_factor=0.5)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(5), 3)
  real = jax.random.normal(keys[0], (2, 8, cfg.hidden_size))
  mask = jnp.concatenate([jnp.ones((2, 5), bool), jnp.zeros((2, 3), bool)], axis=1)
  run = nnx.jit(lambda m, x, mask: m(x, None, mask)[1]["moe_drop_rate"])
  rates = []
  for key in keys[1:]:
    x = jnp.where(mask[..., None], real, 50.0 * jax.random.normal(key, real.shape))
    rates.append(float(run(layer, x, mask)))
  assert rates[0] == rates[1] > 0
  idx, _, _ = layer.route(real.reshape(16, -1))
  keep = np.asarray(mask).reshape(-1)
  capacity = moe_dispatch.expert_capacity(16, 2, 8, 0.5)
  counts, dropped = np.zeros(8, int), 0
  for j in range(2):  # Choice-major priority, real tokens only.
    for n in np.flatnonzero(keep):
      e = int(idx[n, j])
      dropped += counts[e] >= capacity
      counts[e] += 1
  np.testing.assert_allclose(rates[0], dropped / (keep.sum() * 2), rtol=1e-6)


def test_auto_paths_follow_the_mesh_platform():
  with jax.set_mesh(make_mesh({"expert": 8})):
    assert moe_dispatch.resolve_impl("auto") == "blocked"
    assert moe_a2a.resolve_exchange("auto") == "padded"
  assert moe_dispatch.resolve_impl("ragged") == "ragged"


def _tpu_devices():
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  for name, value in (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                        chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as err:  # noqa: BLE001 - no usable libtpu here.
    pytest.skip(f"no TPU topology: {err}")
  return list(topo.devices)


@pytest.mark.slow
def test_tpu_hlo_has_ragged_all_to_all_and_no_token_all_gather():
  """Compiled for v5p:2x2x1 (expert=4) by the TPU compiler: the auto dispatch exchanges tokens
  with ragged-all-to-all and gathers none; the all-gather path does gather them."""
  mesh = make_mesh({"expert": 4}, devices=_tpu_devices())
  sharded = jax.sharding.NamedSharding(mesh, jax.P("expert"))
  shapes = [((N, 128), jnp.bfloat16), ((N, K), jnp.int32), ((N, K), jnp.float32),
            ((E, 128, 128), jnp.bfloat16), ((E, 128, 128), jnp.bfloat16),
            ((E, 128, 128), jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharded) for s, d in shapes]
  texts = {}
  with jax.set_mesh(mesh):
    assert moe_dispatch.resolve_impl("auto") == "gmm"
    assert moe_a2a.resolve_exchange("auto") == "ragged"
    for dispatch in ("auto", "allgather"):
      fn = lambda *a, dispatch=dispatch: routed_experts(*a, dispatch=dispatch)[0]
      texts[dispatch] = jax.jit(fn).lower(*args).compile().as_text()
  assert "ragged-all-to-all" in texts["auto"] and "all-gather" not in texts["auto"]
  assert "all-gather" in texts["allgather"] and "ragged-all-to-all" not in texts["allgather"]

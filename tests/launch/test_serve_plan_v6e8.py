"""The v6e-8 serving layout (configs/serve_glm45_air.py, parallel/rules
SERVING_EXPERTS_OVER_TENSOR_RULES): whole experts over `tensor`, so no expert weight is padded
to 128 lanes on TPU. Splitting the expert hidden dim 8 ways (SERVING_RULES at tensor 8) pads
glm45_air's gate/up stacks 176 -> 256 and its weights alone exceed a v6e chip's HBM; the TPU
compiler's input bytes (reduced compile on v6e:2x2) show the padded stacks and their absence."""

import math

import pytest

from configs import serve_glm45_air
from klong_jax.launch import serve_plan
from klong_jax.launch import tpu_topology as topo_lib
from klong_jax.model.config import from_config_dict
from klong_jax.parallel import rules as rules_lib

GIB = 2**30


def _setup(config, rules, topology):
  """The served model's abstract params on `topology`'s TPU devices (libtpu; no compile)."""
  import jax

  from klong_jax.parallel import mesh as mesh_lib
  topo = topo_lib.parse_topology(topology)
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices=topo_lib.devices(topo)[:topo.chips])
  return serve_plan.abstract_serving_model(serve_plan.ServeSetup(
      from_config_dict(config.model), mesh, rules, config.serve.max_batch, config.serve.max_len,
      jax.numpy.bfloat16, 64))


def _laid_out(params):
  import jax

  from klong_jax.inference import weight_layout
  return sum(weight_layout.laid_out_bytes(x.shape, x.dtype, x.sharding)
             for x in jax.tree.leaves(params))


def test_v6e8_rules_put_whole_experts_on_the_tensor_axis():
  config = serve_glm45_air.get_config("slice=v6e-8")
  rules = dict(rules_lib.resolve_rules(config.rules))
  assert rules["expert"] == "tensor" and rules["expert_mlp"] is None
  assert rules["heads"] == rules["kv_heads"] == rules["vocab"] == "tensor"
  mesh = dict(config.mesh)
  assert rules_lib.shard_count(mesh, tuple(rules.items()), "expert") == 8
  # 1408 whole per chip: a multiple of TPU's 128 lanes (1408 / 8 = 176 is not).
  assert config.model.moe_intermediate_size % 128 == 0
  assert (config.model.moe_intermediate_size // 8) % 128
  assert rules_lib.resolve_rules(serve_glm45_air.get_config("slice=v5p-8").rules) \
      == rules_lib.SERVING_RULES


def test_glm45_air_v6e8_weights_as_tpu_lays_them_out():
  """Full-size glm45_air on the v6e-8 topology's devices (abstract, no compile): under the v6e-8
  rules the weights need < 1% of tile padding and, with the 6-row page pool, fit HBM; under
  SERVING_RULES (tensor 8 splits the expert hidden dim) the weights alone do not fit."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  config = serve_glm45_air.get_config("slice=v6e-8")
  hbm = topo_lib.parse_topology("v6e-8").hbm_gib * GIB
  fixed = _setup(config, rules_lib.resolve_rules(config.rules), "v6e-8").params
  counted = serve_plan._bytes(fixed)
  assert counted < _laid_out(fixed) < 1.01 * counted  # The shared experts' 176 lanes pad.
  assert serve_plan.layout_notes(fixed) == ()
  cfg = config.model
  row = cfg.num_layers * config.serve.max_len * 2 * cfg.num_kv_heads * cfg.head_dim * 2 / 8
  assert _laid_out(fixed) + config.serve.max_batch * row < 0.97 * hbm
  split = _setup(config, rules_lib.SERVING_RULES, "v6e-8").params
  assert serve_plan._bytes(split) == pytest.approx(counted, rel=1e-3)
  assert _laid_out(split) > hbm > counted
  (note,) = serve_plan.layout_notes(split)
  assert "['gate_edf']" in note and "[45, 128, 4096, 176] per chip" in note


def _reduced(rules=None):
  """The v6e-8 serving config on v6e:2x2 (tensor 4) with a small MoE whose expert hidden 256 is
  lane-aligned whole and 64 per chip when split over `tensor`."""
  config = serve_glm45_air.get_config("slice=v6e-8,max_batch=4,max_len=256")
  config.mesh.tensor = 4
  for k, v in dict(vocab_size=1024, hidden_size=384, num_heads=8, num_kv_heads=4, head_dim=128,
                   intermediate_size=512, moe_intermediate_size=256, num_experts=16,
                   num_experts_per_tok=2, num_shared_experts=0, num_layers=3, dtype="bfloat16",
                   param_dtype="bfloat16").items():
    config.model[k] = v
  config.serve.update(prefix_cache_mb=0, token_budget=32, decode_steps=2)
  if rules is not None:
    config.rules = rules
  return config


@pytest.mark.slow
def test_tpu_compile_on_v6e_2x2_holds_no_padded_expert_stacks():
  """The TPU compiler's own input bytes for the paged 2-step decode call: under the v6e rules
  they are the laid-out weights + pool, with no expert-weight gather or relayout copy; under
  SERVING_RULES they hold the gate/up stacks padded 64 -> 128 lanes (2x) on every chip, and the
  call copies one of them (relayout)."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  plans = {}
  for name, rules in (("experts_over_tensor", None), ("split", rules_lib.SERVING_RULES)):
    config = _reduced(rules)
    (plans[name],) = serve_plan.plan_serve_topology(config, "v6e:2x2", steps=("decode",))
    print(plans[name].report())
    laid = _laid_out(_setup(config, rules_lib.resolve_rules(config.rules), "v6e:2x2").params)
    # laid_out_bytes leaves out the tiles of small vectors (norms, biases): a few KiB here.
    assert plans[name].arguments == pytest.approx(laid + plans[name].kv_cache, abs=2**16)
  fixed, split = plans["experts_over_tensor"], plans["split"]
  assert "TPU v6" in fixed.device and fixed.fits
  assert fixed.expert_gathers == () and fixed.kernels.get("gmm")
  cfg = from_config_dict(_reduced().model)
  rules = rules_lib.resolve_rules(_reduced().rules)
  assert not serve_plan._expert_shaped(fixed.argument_copies, cfg, {"tensor": 4}, rules)
  # Split, the 64-lane gate/up stacks are also relaid out (model dim minor) on every call.
  assert serve_plan._expert_shaped(split.argument_copies, cfg, {"tensor": 4}, None), \
      split.argument_copies
  moe_layers = cfg.num_layers - cfg.first_k_dense
  # gate + up: [moe layers, experts, model, hidden / 4] per chip, padded from 64 to 128 lanes.
  stacks = 2 * moe_layers * cfg.num_experts * cfg.hidden_size * (128 - 64) * 2
  assert split.arguments - fixed.arguments == pytest.approx(stacks, rel=0.02)
  assert math.isclose(split.weights, fixed.weights, rel_tol=1e-3)

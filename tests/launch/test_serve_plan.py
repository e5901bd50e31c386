"""Serving plan (launch/serve_plan.py) and the per-slice serving configs: start-up checks,
exact weight / KV-cache bytes, and a TPU-compiler compile of the engine's decode + prefill on
v5p:2x2x1 at reduced size with no all-gather of expert weights (FSDP training rules: some)."""

import dataclasses
import math

import pytest

from configs import serve_glm45_air
from klong_jax.launch import checks, serve_plan
from klong_jax.launch import tpu_topology as topo_lib
from klong_jax.model import precision
from klong_jax.model.config import get_preset
from klong_jax.parallel import rules as rules_lib
from launch import tpu


@pytest.mark.parametrize("slice_name", sorted(serve_glm45_air.SLICES))
def test_serve_configs_pass_the_start_up_checks(slice_name):
  config = serve_glm45_air.get_config(f"slice={slice_name}")
  topo = topo_lib.parse_topology(slice_name)
  mesh = {k: v for k, v in config.mesh.items()}
  checks.check_mesh(mesh, topo.chips, slice_name)
  rules = rules_lib.resolve_rules(config.rules)
  assert rules == serve_glm45_air.SLICE_RULES.get(slice_name, rules_lib.SERVING_RULES)
  checks.check_batch(config.serve.max_batch, mesh, rules, field="serve.max_batch")
  rules_lib.check_divisible(config.model, mesh, rules)
  assert config.model.param_dtype == "bfloat16" and config.serve.cache_dtype == "bfloat16"
  assert config.serve.engine == serve_glm45_air.SLICES[slice_name][3]  # the one planned there
  # Weights per chip from the shapes (bf16, the policy's fp32 leaves are ~0.1%) fit the HBM.
  total = 106e9 * 2 / topo.chips
  assert total < topo.hbm_gib * 2**30


def test_serving_rules_keep_training_names_and_drop_fsdp():
  train, serve = dict(rules_lib.LOGICAL_RULES), dict(rules_lib.SERVING_RULES)
  assert train.keys() == serve.keys()
  assert serve["expert"] == "expert" and serve["expert_embed"] is None and serve["embed"] is None
  assert "fsdp" not in str(serve.values())
  assert rules_lib.resolve_rules("serving") is rules_lib.SERVING_RULES
  assert rules_lib.resolve_rules(()) is rules_lib.LOGICAL_RULES
  with pytest.raises(ValueError, match="rules 'servng' unknown"):
    rules_lib.resolve_rules("servng")


def test_launcher_uses_the_slice_serving_config():
  spec, note = tpu.server_config_spec("glm45_air", "v5p-8")
  assert spec == "configs/serve_glm45_air.py:slice=v5p-8" and "--step=serve" in note
  spec, _ = tpu.server_config_spec("glm45_air", "v5p-8", "max_len=8192")
  assert spec.endswith("slice=v5p-8,max_len=8192")
  spec, note = tpu.server_config_spec("tiny", "v5p-8", "max_batch=8")
  assert spec == "configs/serve_tiny.py:preset=tiny,max_batch=8"
  with pytest.raises(ValueError, match="slice='v4-8' has no serving config"):
    tpu.server_config_spec("glm45_air", "v4-8")
  with pytest.raises(checks.StartupError, match="serve.max_batch=3"):
    tpu.server_config_spec("glm45_air", "v5p-8", "max_batch=3")


def _reduced(rules_name="serving", mesh=None):
  """The v5p-8 serving config with a small MoE (bf16) in place of glm45_air."""
  config = serve_glm45_air.get_config("slice=v5p-8,max_batch=8,max_len=256")
  config.serve.engine = "dense"  # the reference engine's steps (_reduced_paged: the paged one)
  model = get_preset("tiny")
  for k, v in dict(vocab_size=1024, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                   intermediate_size=192, moe_intermediate_size=96, num_experts=8,
                   num_layers=3, dtype="bfloat16", param_dtype="bfloat16").items():
    config.model[k] = v
  assert model.num_experts_per_tok <= 8
  if rules_name != "serving":
    config.rules = rules_lib.LOGICAL_RULES
  if mesh:
    for k, v in mesh.items():
      config.mesh[k] = v
  return config


def test_reduced_plan_bytes_are_exact_on_fake_devices():
  """Weights and KV bytes per chip from the shardings equal a hand count (no compile needed:
  the builders alone), on 4 fake CPU devices as the serving mesh."""
  import jax
  config = _reduced()
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  cfg = from_config_dict(config.model)
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices=jax.devices()[:4])
  setup = serve_plan.abstract_serving_model(serve_plan.ServeSetup(
      cfg, mesh, rules_lib.SERVING_RULES, 8, 256, jax.numpy.bfloat16, 64))
  step = serve_plan.dense_decode(setup)
  # KV: [L, B, S, kv_heads, head_dim] x (k, v) in bf16, rows / expert 2, kv heads / tensor 2.
  assert step.kv_cache == 3 * 8 * 256 * 2 * 32 * 2 * 2 / 4
  kept = [x for p, x in jax.tree_util.tree_leaves_with_path(setup.params)
          if precision.keeps_fp32(p)]
  assert kept and all(x.dtype == jax.numpy.float32 for x in kept)
  assert all(x.dtype == jax.numpy.bfloat16 for p, x in
             jax.tree_util.tree_leaves_with_path(setup.params) if not precision.keeps_fp32(p)
             and x.dtype != jax.numpy.int32)
  experts = [x for p, x in jax.tree_util.tree_leaves_with_path(setup.params)
             if x.ndim == 4 and 8 in x.shape]
  assert experts
  for x in experts:  # Expert stacks: 1/4 per chip (experts / 2, hidden / 2), model dim whole.
    assert math.prod(x.sharding.shard_shape(x.shape)) * 4 == math.prod(x.shape)


@pytest.mark.slow
def test_tpu_compile_of_decode_and_prefill_on_v5p_2x2x1():
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  plans = serve_plan.plan_serve_topology(_reduced(), "v5p:2x2x1", prefill_len=64)
  for p in plans:
    print(p.report())
    assert "TPU v5" in p.device and p.fits and p.weights > 0 and p.temp > 0
    assert p.expert_gathers == (), p.expert_gathers
    assert p.arguments >= p.weights + p.kv_cache * 0.99
  decode = plans[0]
  assert decode.step == "decode" and decode.kv_cache == 3 * 8 * 256 * 2 * 32 * 2 * 2 / 4
  # Expert parallelism: tokens travel to their experts (all-to-all), weights stay.
  kinds = set(decode.collectives)
  assert kinds & {"all-to-all", "ragged-all-to-all"}, decode.collectives
  assert "FITS" in decode.report() and "all-gathers of expert weights: none" in decode.report()
  # The same model under the training rules (FSDP over the expert model dim) gathers experts
  # every decode step: the check sees it.
  fsdp = serve_plan.plan_serve_topology(_reduced("training", dict(fsdp=2, tensor=1)),
                                        "v5p:2x2x1", steps=("decode",))[0]
  assert fsdp.expert_gathers, fsdp.collectives
  # The verdict against a chip with half the peak: DOES NOT FIT.
  small = dataclasses.replace(decode, hbm=decode.peak / 2)
  assert small.fits is False and "DOES NOT FIT" in small.report()


def _reduced_paged():
  """The reduced model served by the paged engine: head_dim 128 (the ragged kernel's lane
  width), a pool of 8 full rows + the trash page, a 32-token mixed step, 2 decode steps a call."""
  config = _reduced()
  config.model.head_dim = 128
  config.serve.update(engine="paged", prefix_cache_mb=0, token_budget=32, decode_steps=2)
  return config


def test_paged_plan_bytes_follow_the_pool_sharding():
  """Paged builders on 4 fake CPU devices (no compile): the pool is 1/tensor per chip (kv heads
  over `tensor`), on every chip of the batch axes, and the plan says what that costs."""
  import jax
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  config = _reduced_paged()
  cfg = from_config_dict(config.model)
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices=jax.devices()[:4])
  pages = 8 * 256 // 16 + 1
  setup = serve_plan.abstract_serving_model(serve_plan.ServeSetup(
      cfg, mesh, rules_lib.SERVING_RULES, 8, 256, jax.numpy.bfloat16, 64, page_size=16,
      num_pages=pages, token_budget=32, decode_steps=2))
  for builder in serve_plan.ENGINES["paged"].values():
    step = builder(setup)
    pool = step.args[3]
    assert pool.shape == (3 * pages, 16, 2 * 2, 128)
    assert pool.sharding.spec[2] == "tensor" and step.kv_cache == 3 * pages * 16 * 4 * 128 * 2 / 2
    assert "(x2)" in step.notes[1] and f"{step.kv_cache / 2 / 2**30:.3f} GiB" in step.notes[1]


@pytest.mark.slow
def test_tpu_compile_of_paged_decode_and_mixed_step_on_v5p_2x2x1():
  """The paged engine's decode call and mixed step, compiled by the TPU compiler on the serving
  mesh (expert 2 x tensor 2): FITS, the ragged kernel runs per kv-head shard, no expert-weight
  all-gather, and nothing the size of the pool is gathered."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  plans = serve_plan.plan_serve_topology(_reduced_paged(), "v5p:2x2x1")
  pages = 8 * 256 // 16 + 1
  for p in plans:
    print(p.report())
    assert p.engine == "paged" and "TPU v5" in p.device and p.fits and p.temp > 0
    assert p.kv_cache == 3 * pages * 16 * 4 * 128 * 2 / 2  # kv heads over tensor 2.
    assert p.expert_gathers == (), p.expert_gathers
    assert p.arguments >= p.weights + p.kv_cache * 0.99
    gathered = p.collectives.get("all-gather")
    assert gathered is None or gathered.bytes < p.kv_cache, p.collectives
    # "auto" attention is the ragged TPU kernel, run per kv-head shard inside the shard_map:
    # one call per layer (x decode steps), each over its chip's 1 of 2 kv heads.
    assert p.kernels.get("ragged_paged_attention_kernel"), p.kernels
  decode, mixed = plans
  assert decode.step == "decode" and mixed.step == "prefill"
  assert {"all-to-all", "ragged-all-to-all"} & set(decode.collectives), decode.collectives
  assert "all-gathers of expert weights: none" in decode.report()
  # 2 decode steps a call: the expert gate/up stacks (per-chip hidden 48, not a multiple of 128)
  # are placed row-major (inference/weight_layout.py), so no relayout copy of them is hoisted
  # out of the step loop (test_paged_decode_without_weight_layout_copies_expert_stacks: with
  # TPU's default layout there is one).
  assert not serve_plan._expert_shaped(decode.argument_copies, _model(), _MESH), \
      decode.argument_copies


_MESH = {"expert": 2, "tensor": 2}


def _model():
  from klong_jax.model.config import from_config_dict
  return from_config_dict(_reduced_paged().model)


@pytest.mark.slow
def test_paged_decode_without_weight_layout_copies_expert_stacks(monkeypatch):
  """The failure weight_layout prevents, at reduced size: with every weight in TPU's default
  layout, the 2-step decode call copies whole expert gate/up stacks ([layers, experts/2, model,
  hidden/2], relaid out so the hidden dim is minor) in its entry computation, once per call."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  from klong_jax.inference import weight_layout
  monkeypatch.setattr(weight_layout, "weight_format", lambda shape, sharding: sharding)
  (decode,) = serve_plan.plan_serve_topology(_reduced_paged(), "v5p:2x2x1", steps=("decode",))
  copies = serve_plan._expert_shaped(decode.argument_copies, _model(), _MESH)
  assert copies == ["bf16[2,4,128,48]"], decode.argument_copies
  assert "per-call copies of whole arguments (relayouts): " in decode.report()


def test_weight_format_is_the_plain_sharding_off_tpu():
  """On CPU the served weights keep the default layout: weight_format adds nothing."""
  import jax

  from klong_jax.inference import weight_layout
  s = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  assert weight_layout.weight_format((2, 4, 128, 48), s) is s
  x = weight_layout.place(jax.numpy.ones((4, 48)), s)
  assert x.format == jax.device_put(jax.numpy.ones((4, 48)), s).format


def test_argument_copies_finds_entry_copies_of_parameters():
  hlo = """HloModule m
%body (p: bf16[2,4,128,48]) -> bf16[2,4,128,48] {
  %copy.1 = bf16[2,4,128,48]{3,2,1,0} copy(%p)
}

ENTRY %main (param.1: bf16[2,4,128,48], param.2: s32[8]) -> s32[8] {
  %param.1 = bf16[2,4,128,48]{2,3,1,0:T(8,128)(2,1)} parameter(0)
  %param.2 = s32[8]{0:T(128)} parameter(1)
  %copy.184 = bf16[2,4,128,48]{3,2,1,0:T(8,128)(2,1)} copy(%param.1), backend_config={}
  %copy.3 = s32[8]{0:T(128)} copy(%param.2)
  %neg = bf16[2,4,128,48]{3,2,1,0} negate(%copy.184)
  %copy.4 = bf16[2,4,128,48]{2,3,1,0} copy(%neg)
}
"""
  assert serve_plan.argument_copies(hlo) == ["bf16[2,4,128,48]{3,2,1,0}"]


def test_serve_plan_verdict_and_json():
  """Peak / FITS come from the shared MemoryVerdict (compiled figures, or the compiler's refusal
  figure) and the plan round-trips through JSON (plan --out)."""
  import json
  p = serve_plan.ServePlan(step="decode", mesh={"expert": 2}, max_batch=8, max_len=256,
                           tokens="8 rows", weights=4.0, kv_cache=2.0, arguments=6.0, temp=1.0,
                           hbm=7.5, engine="paged", notes=("page pool: 9 pages",),
                           collectives={"all-to-all": topo_lib.Collective(3, 10.0)},
                           kernels={"ragged_paged_attention_kernel": 2})
  assert p.peak == 7.0 and p.fits is True and "KV page pool" in p.report()
  d = json.loads(json.dumps(p.as_dict()))
  assert d["fits"] is True and d["peak"] == 7.0 and d["collectives"]["all-to-all"]["count"] == 3
  refused = dataclasses.replace(p, refused="out of HBM", required=9.0)
  assert refused.peak == 9.0 and refused.fits is False
  assert dataclasses.replace(refused, required=None).peak == 6.0  # weights + pool at least.


@pytest.mark.slow
def test_tpu_weight_format_placement_matches_the_planned_input_layout():
  """On TPU devices (libtpu, compile-only): a weight whose per-chip last dim is 48 gets a
  row-major Format, a lane-aligned one keeps the plain sharding; what device_put to that Format
  produces (an identity with that output format) has the layout the plan lowers the steps with."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  import jax
  import numpy as np

  from klong_jax.inference import weight_layout
  devs = topo_lib.devices(topo_lib.parse_topology("v5p:2x2x1"))
  mesh = jax.sharding.Mesh(np.array(devs).reshape(2, 2), ("expert", "tensor"))
  s = jax.sharding.NamedSharding(mesh, jax.P(None, "expert", None, "tensor"))
  assert weight_layout.weight_format((2, 8, 128, 512), s) is s  # 256 per chip.
  shape = (2, 8, 128, 96)  # 48 per chip.
  fmt = weight_layout.weight_format(shape, s)
  assert fmt.layout.major_to_minor == (0, 1, 2, 3) and fmt.sharding == s
  src = jax.ShapeDtypeStruct(shape, jax.numpy.bfloat16, sharding=s)
  put = jax.jit(lambda x: x, out_shardings=fmt).lower(src).compile().output_formats.layout
  planned = jax.jit(lambda x: x * 2).lower(
      weight_layout.abstract(shape, jax.numpy.bfloat16, s)).compile().input_formats[0][0].layout
  default = jax.jit(lambda x: x * 2).lower(src).compile().input_formats[0][0].layout
  assert put == planned and planned.major_to_minor == (0, 1, 2, 3)
  assert default.major_to_minor != (0, 1, 2, 3)  # TPU's default: the model dim minor.

"""AOT plan of the real SFT step on fake CPU devices vs what a real step leaves live in memory."""

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny
from klong_jax.launch import checks
from klong_jax.launch import plan as plan_lib
from klong_jax.launch import tpu_topology as topo_lib
from klong_jax.model import sharded
from klong_jax.model.config import from_config_dict
from klong_jax.parallel import mesh as mesh_lib
from klong_jax.parallel import rules as rules_lib
from klong_jax.train import step as step_lib

MESH = {"data": 1, "fsdp": 4, "expert": 2, "tensor": 1}


def _device_bytes(device: jax.Device, arrays=None) -> int:
  """Bytes of the arrays' (default: every live array's) shards on `device` (CPU has no
  allocator stats)."""
  total = 0
  for arr in jax.live_arrays() if arrays is None else arrays:
    for shard in arr.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def test_plan_memory_matches_live_buffers_after_a_real_step():
  """Must-show: the plan's per-device state + batch agrees with live buffers within 20%."""
  config = sft_tiny.get_config()
  model_cfg = from_config_dict(config.model)
  rules = rules_lib.LOGICAL_RULES
  mesh = mesh_lib.make_mesh(MESH)
  batch, seq = 8, 64
  one = plan_lib.compile_step(model_cfg, config.optim, mesh, rules, batch, seq)
  plan = plan_lib.plan_from_compiled(one, MESH, batch, seq, model_cfg.num_layers, hbm_gib=1.0)
  assert plan.arguments == pytest.approx(plan.persistent)  # XLA agrees with the shardings.
  assert plan.temp > 0 and plan.fits

  gc.collect()
  device = mesh.devices.flat[0]
  before = _device_bytes(device)
  model = sharded.create_sharded_model(model_cfg, mesh, rules=rules)
  _, params, rest = step_lib.split_model(model)
  state = step_lib.init_state(params, rest, one.tx, one.state_shardings)
  del model, params, rest
  rng = np.random.default_rng(0)
  arrays = {"tokens": rng.integers(1, model_cfg.vocab_size, (batch, seq)),
            "positions": np.tile(np.arange(seq), (batch, 1)),
            "segment_ids": np.ones((batch, seq)), "loss_mask": np.ones((batch, seq))}
  inputs = {k: jax.device_put(jnp.asarray(v, jnp.int32), one.batch_sharding)
            for k, v in arrays.items()}
  state, metrics = one.compiled(state, inputs)  # The planned executable, on real arrays.
  jax.block_until_ready((state, metrics))
  assert np.isfinite(float(metrics["loss"]))
  gc.collect()
  # The state + batch buffers the step really holds on device 0. (The device-wide delta is
  # printed too; it also counts arrays other tests in this worker process left alive.)
  live = _device_bytes(device, jax.tree.leaves((state, inputs)))
  delta = _device_bytes(device) - before
  print(f"plan state+batch {plan.persistent:.0f} B/device, live {live} B (device delta "
        f"{delta} B), temp {plan.temp:.0f} B")
  assert abs(live - plan.persistent) <= 0.2 * plan.persistent, (live, plan.persistent)
  text = plan.report()
  assert "FITS" in text and "optimizer state" in text


@pytest.mark.slow
def test_probe_extrapolation_matches_full_compile():
  """Compiling 2 and 4 MoE layers and scaling linearly predicts the 5-MoE-layer compile."""
  config = sft_tiny.get_config()
  config.model.num_layers = 6  # 1 dense + 5 MoE.
  sizes = {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
  full = plan_lib.plan(config, sizes, 2, 32, probe_layers=False)
  probed = plan_lib.plan(config, sizes, 2, 32, probe_layers=True)
  assert probed.probed_layers == plan_lib.PROBES
  assert probed.persistent == pytest.approx(full.persistent)
  assert probed.arguments == pytest.approx(full.arguments, rel=0.01)
  print(f"temp: probed {probed.temp:.0f} B, full compile {full.temp:.0f} B")
  assert probed.temp == pytest.approx(full.temp, rel=0.2), (probed.temp, full.temp)


def test_bad_inputs_name_the_fix():
  with pytest.raises(ValueError, match="axis:size"):
    plan_lib.parse_mesh("fsdp=8")
  with pytest.raises(ValueError, match="needs 4096 devices"):
    plan_lib.plan(sft_tiny.get_config(), plan_lib.parse_mesh("fsdp:4096"), 8, 8)
  assert plan_lib.parse_mesh("fsdp:64,expert:8,tensor:4") == {
      "data": 1, "fsdp": 64, "expert": 8, "tensor": 4, "context": 1}
  env = plan_lib.device_env(16, {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=16"
  assert env["JAX_PLATFORMS"] == "cpu"


# ---- TPU topologies: refusals before compiling, the HLO parser, a real TPU compile ----------

def _tiny_bf16():
  config = sft_tiny.get_config()
  config.model.dtype = "bfloat16"
  return config


@pytest.mark.parametrize("spec,dims,chips,bounds,hbm", [
    ("v5p-8", (2, 2, 1), 4, (2, 2, 1), 95.74), ("v5p-16", (2, 2, 2), 8, (2, 2, 1), 95.74),
    ("v5p-128", (4, 4, 4), 64, (2, 2, 1), 95.74), ("v5p-256", (4, 4, 8), 128, (2, 2, 1), 95.74),
    ("v6e-8", (2, 4), 8, (2, 4, 1), 31.25), ("v6e-256", (16, 16), 256, (2, 2, 1), 31.25),
    ("v5p:2x2x1", (2, 2, 1), 4, (2, 2, 1), 95.74)])
def test_topology_names(spec, dims, chips, bounds, hbm):
  t = topo_lib.parse_topology(spec)
  assert (t.dims, t.chips, t.chips_per_host_bounds, t.hbm_gib) == (dims, chips, bounds, hbm)
  assert t.name == f"{spec.split('-')[0].split(':')[0]}:{'x'.join(map(str, dims))}"


def test_topology_bad_names():
  for bad in ("v9-8", "tpu-256", "v5p-3", "v5p-24"):
    with pytest.raises(ValueError, match="v5p"):
      topo_lib.parse_topology(bad)


def test_refuses_configs_that_cannot_start_before_compiling():
  """Each refusal names the fix; none needs libtpu or devices (raised before compiling)."""
  config = _tiny_bf16()  # 8 experts, 4 heads, 2 kv heads.
  cases = [
      (dict(fsdp=2, expert=2), 6, r"data.batch_size=6 does not divide over the batch mesh axes "
       r"data\*fsdp\*expert = 4 devices.*use data.batch_size=8"),
      (dict(fsdp=1, expert=4), 4, None),
      (dict(fsdp=1, tensor=4), 4, r"num_kv_heads=2"),
      (dict(fsdp=4, expert=2), 8, r"has 8 devices but v5p:2x2x1 has 4 chips"),
  ]
  for sizes, batch, match in cases:
    mesh = {**dict.fromkeys(("data", "fsdp", "expert", "tensor"), 1), **sizes}
    if match is None:  # This one can start: the checks pass (nothing is compiled here).
      checks.check_startable(from_config_dict(config.model), mesh, batch, chips=4)
      continue
    with pytest.raises(checks.StartupError, match=match):
      plan_lib.plan_topology(config, "v5p:2x2x1", mesh, batch, 64)
  # On fake CPU devices too (3 of the 8): experts vs the expert axis.
  with pytest.raises(checks.StartupError, match=r"\('expert',\) \(size 3\).*num_experts=8"):
    plan_lib.plan(config, plan_lib.parse_mesh("expert:3"), 6, 64)
  with pytest.raises(checks.StartupError, match=r"rl.minibatches"):
    checks.check_startable(from_config_dict(config.model), {"fsdp": 4}, 8,
                           rl={"minibatches": 4})


def test_collectives_and_compiler_oom_parsing():
  hlo = """
  %all-gather.1 = bf16[512,1024]{1,0:T(8,128)(2,1)} all-gather(%convert), channel_id=2
  %ags = (bf16[64,1024]{1,0}, bf16[512,1024]{1,0}) all-gather-start(%p), channel_id=3
  %agd = bf16[512,1024]{1,0} all-gather-done(%ags)
  ROOT %all-reduce = f32[512]{0:T(512)} all-reduce(%fusion), channel_id=4
  %a2a = (bf16[8,16]{1,0}, bf16[8,16]{1,0}) all-to-all(%x, %y), channel_id=5
  %cp = f32[4,4]{1,0} collective-permute(%z), source_target_pairs={{0,1}}
  %rs = f32[128]{0} reduce-scatter(%w), dimensions={0}
  %f = f32[4]{0} fusion(%all-gather.1), kind=kLoop
  """
  found = topo_lib.collectives(hlo)
  assert {k: v.count for k, v in found.items()} == {
      "all-gather": 2, "all-reduce": 1, "all-to-all": 1, "collective-permute": 1,
      "reduce-scatter": 1}
  assert found["all-gather"].bytes == 2 * 512 * 1024 * 2  # The start's result, not its operand.
  assert found["all-to-all"].bytes == 2 * 8 * 16 * 2 and found["all-reduce"].bytes == 512 * 4
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (582.16G) exceeds available HBM (95.74G).")
  assert msg in topo_lib.compiler_oom(RuntimeError("XlaRuntimeError: " + msg))
  assert topo_lib.compiler_oom(RuntimeError("INVALID_ARGUMENT: bad shape")) is None
  assert topo_lib.required_bytes(msg) == pytest.approx(582.16 * 2**30)
  refused = plan_lib.Plan(mesh={"fsdp": 128}, batch=128, seq_len=32768, num_layers=46,
                          params=1.0, optimizer=2.0, model_state=0.0, batch_inputs=0.0,
                          arguments=0.0, temp=0.0, output_not_aliased=0.0, hbm=95 * 2**30,
                          refused=msg, required=topo_lib.required_bytes(msg))
  assert refused.fits is False and "DOES NOT FIT" in refused.report()
  assert "582.2 GiB" in refused.report()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["sft", "rl"])
def test_tpu_compile_of_the_real_step_on_v5p_2x2x1(step):
  """The TPU compiler (libtpu, no TPU) compiles the real SFT / RL step of the tiny bf16 model on a
  4-chip v5p topology: positive per-chip memory, a populated collective table, FITS."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  p = plan_lib.plan_topology(_tiny_bf16(), "v5p:2x2x1", {"data": 1, "fsdp": 2, "expert": 2,
                                                          "tensor": 1}, 4, 128, step=step)
  print(p.report())
  assert "TPU v5" in p.device and p.hbm == 95.74 * 2**30
  # The "auto" switches follow the mesh's platform although JAX runs on CPU here: the MoE tokens
  # travel by ragged all-to-all (expert axis 2 shares the token axes), TPU's dispatch.
  assert p.collectives["ragged-all-to-all"].count > 0, p.collectives
  assert p.params > 0 and p.optimizer > 0 and p.batch_inputs > 0 and p.temp > 0
  assert p.arguments >= p.persistent and p.fits
  assert (p.reference == p.params) if step == "rl" else p.reference == 0.0
  assert p.collectives["all-gather"].count > 0 and p.collectives["all-reduce"].count > 0
  assert all(c.bytes > 0 for c in p.collectives.values())
  text = p.report()
  assert "FITS" in text and "collectives" in text and "all-gather" in text


def test_libtpu_missing_is_detected_and_named(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError.
  problem = topo_lib.libtpu_status()
  assert problem and "libtpu cannot be imported" in problem and "jax[tpu]" in problem
  with pytest.raises(RuntimeError, match="libtpu cannot be imported"):
    topo_lib.devices(topo_lib.parse_topology("v5p:2x2x1"))


@pytest.mark.parametrize("spec,sizes", [("v5p-256", {"fsdp": 16, "expert": 8}),
                                        ("v6e-256", {"fsdp": 32, "expert": 8})])
def test_pod_meshes_build_on_the_real_torus(spec, sizes):
  """The pod configs' meshes on the slices' physical tori (v6e-256 = 16x16 must split an axis)."""
  problem = topo_lib.libtpu_status()
  if problem:
    pytest.skip(problem)
  mesh = mesh_lib.make_mesh(sizes, devices=topo_lib.devices(topo_lib.parse_topology(spec)))
  assert {k: v for k, v in mesh.shape.items() if v > 1} == sizes


def test_square_buffers_finds_t_by_t_shapes_in_hlo():
  hlo = ("%a = bf16[1,2,4,8192,8192]{4,3,2,1,0} fusion(...)\n"
         "%b = f32[8192,4096]{1,0} dot(...)\n%c = pred[2,8192,8192]{2,1,0} compare(...)")
  assert topo_lib.square_buffers(hlo, 8192) == ["bf16[1,2,4,8192,8192]", "pred[2,8192,8192]"]
  assert topo_lib.square_buffers(hlo, 8193) == []

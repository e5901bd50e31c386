"""AOT plan of the real SFT step on fake CPU devices vs what a real step leaves live in memory."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny
from klong_jax.launch import plan as plan_lib
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
      "data": 1, "fsdp": 64, "expert": 8, "tensor": 4}
  env = plan_lib.device_env(16, {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=16"
  assert env["JAX_PLATFORMS"] == "cpu"

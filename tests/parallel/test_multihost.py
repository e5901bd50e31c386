"""Multi-host SFT, simulated: 2 JAX processes x 4 CPU devices == 1 process x 8 devices.

Each process initialises `jax.distributed` over loopback through the launcher's env contract
(KLONG_COORDINATOR / KLONG_NUM_PROCESSES / KLONG_PROCESS_ID, read by
`mesh.maybe_initialize_distributed`), builds the same data x fsdp x expert mesh over the 8 global
devices and runs a few sharded SFT steps on a fixed batch; losses and final params must match
the single-process run. Run as a script (`--worker OUT`) it is one of those processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import multiproc

MESH = {"data": 2, "fsdp": 2, "expert": 2}
STEPS = 3
B, L = 8, 32


def _batch() -> dict[str, np.ndarray]:
  """A fixed [8, 32] packed batch (two chunks per row, padding on half the rows)."""
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, 20:] = 2
  seg[::2, 28:] = 0
  pos = np.concatenate([np.arange(20), np.arange(L - 20)])
  return {"tokens": rng.integers(0, 512, (B, L)).astype(np.int32),
          "positions": np.tile(pos, (B, 1)).astype(np.int32) * (seg > 0),
          "segment_ids": seg,
          "loss_mask": (rng.random((B, L)) < 0.6).astype(np.int32) * (seg > 0)}


def train(steps: int = STEPS) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
  """Sharded SFT steps on the tiny preset over every global device -> (metrics, host params)."""
  import jax  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from klong_jax.parallel.mesh import make_mesh  # noqa: PLC0415
  from klong_jax.parallel.rules import LOGICAL_RULES  # noqa: PLC0415
  from klong_jax.train import step as step_lib  # noqa: PLC0415
  from tests.train.step_testlib import tiny_train_state  # noqa: PLC0415

  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=1, total_steps=10, clip_norm=1.0, weight_decay=0.01, lb_coef=1e-2,
      z_coef=1e-3, expert_bias_rate=1e-2, compute_dtype="float32", final_lr_ratio=0.1, b1=0.9,
      b2=0.95, eps=1e-8, grad_accum=1))
  mesh = make_mesh(MESH)
  graphdef, tx, sh, state, bsh = tiny_train_state(mesh, ocfg)
  fn = step_lib.make_sft_step(graphdef, tx, ocfg, sh, bsh, LOGICAL_RULES)
  host = _batch()
  # Every process knows the whole fixed batch; each fills only its addressable shards.
  batch = {k: jax.make_array_from_callback(v.shape, bsh, lambda idx, v=v: v[idx])
           for k, v in host.items()}
  out = []
  for _ in range(steps):
    state, m = fn(state, batch)
    out.append({k: float(v) for k, v in m.items()})
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params_np = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
               for p, x in flat}
  return out, params_np


def _worker(out_path: str) -> None:
  import jax  # noqa: PLC0415

  jax.config.update("jax_num_cpu_devices", 4)
  from klong_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415

  assert maybe_initialize_distributed(), "KLONG_COORDINATOR must be set for a worker"
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                                  jax.device_count())
  metrics, params = train()
  if jax.process_index() == 0:
    np.savez(out_path + ".npz", **params)
  with open(f"{out_path}.{jax.process_index()}.json", "w") as f:
    json.dump({"metrics": metrics, "local_devices": jax.local_device_count()}, f)
  jax.distributed.shutdown()


def _start_workers(out: str) -> list[subprocess.Popen]:
  """Two worker processes; 4 CPU devices each come from jax_num_cpu_devices, not XLA_FLAGS."""
  return multiproc.start_two([os.path.abspath(__file__), "--worker", out], XLA_FLAGS=None)


def _collect(procs: list[subprocess.Popen], out: str) -> tuple[list[dict], dict[str, np.ndarray]]:
  multiproc.wait_all(procs)
  runs = [json.load(open(f"{out}.{i}.json")) for i in range(2)]
  return runs, dict(np.load(out + ".npz"))


@pytest.mark.subprocess
def test_two_processes_match_single_process(tmp_path):
  import jax  # noqa: PLC0415

  assert jax.device_count() == 8, "tests/conftest.py should give this process 8 CPU devices"
  out = str(tmp_path / "run")
  procs = _start_workers(out)
  try:
    metrics1, params1 = train()  # the 1-process x 8-device reference, while the workers run
  finally:
    runs, params2 = _collect(procs, out)
  assert [r["local_devices"] for r in runs] == [4, 4]
  # Both processes see the same replicated metrics.
  assert runs[0]["metrics"] == runs[1]["metrics"]
  assert metrics1[-1]["loss"] < metrics1[0]["loss"]  # it trains (step 0 has lr 0)
  for a, b in zip(metrics1, runs[0]["metrics"], strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert params1.keys() == params2.keys()
  for k in params1:
    # atol 1e-4 = 1% of one lr=1e-2 Adam step (reduction-order noise, as in test_step.py).
    np.testing.assert_allclose(params1[k], params2[k], rtol=1e-5, atol=1e-4, err_msg=k)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
  else:
    sys.exit("usage: test_multihost.py --worker OUT_PREFIX (pytest runs the test)")

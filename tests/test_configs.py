"""Experiment configs: training and inference agree (context policy); the pod configs load, fit
their mesh and render a launch plan."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs import rl_tiny, sft_tiny
from klong_jax import config_util
from klong_jax.model.config import from_config_dict, get_preset
from klong_jax.parallel import rules as rules_lib
from klong_jax.rl import train as rl_train
from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_and_rl_split_alike_and_never_truncate_the_prefix():
  sft, rl = sft_tiny.get_config().data, rl_tiny.get_config().data
  assert sft.truncate is False  # True only in the ablation's "truncated" arm.
  split = rl_train.stream_config(rl_tiny.get_config(), "/tmp/s", sync=False).split
  assert split.truncate is False
  for key in ("overlap", "completion_tokens", "train_overlap"):
    assert sft[key] == rl[key], key


# ---- the pod configs (README "The pod path") -----------------------------------------------------

POD = {"sft": "configs/sft_glm45_air.py", "rl": "configs/rl_glm45_air.py"}


# v6e-256 has 256 chips (batch axes 32 x 8): SFT needs >= 256 rows, RL 4 minibatches of 256.
@pytest.mark.parametrize("kind", sorted(POD))
@pytest.mark.parametrize("tpu_type,fsdp,args", [("v5p-256", 16, {}),
                                                ("v6e-256", 32, {"sft": "batch=256",
                                                                 "rl": "batch=1024"})])
def test_pod_configs_load_and_fit_the_mesh(kind, tpu_type, fsdp, args):
  c = config_util.load_config(POD[kind], args.get(kind, ""))
  assert from_config_dict(c.model) == get_preset("glm45_air").replace(remat_policy="full",
                                                                  moe_token_chunk=4096)
  trainer_slice = tpu.parse_slice(tpu_type)
  mesh = tpu.resolve_mesh(c.mesh, trainer_slice.chips)
  assert mesh == {"data": 1, "fsdp": fsdp, "expert": 8, "tensor": 1, "context": 1}
  rules_lib.check_divisible(c.model, mesh, tuple(c.rules or rules_lib.LOGICAL_RULES))
  assert "start-up checks passed" in tpu.validate(c, trainer_slice, mesh)  # batch vs batch axes
  assert c.data.max_len == c.data.row_len == 32768 and c.optim.compute_dtype == "bfloat16"


def test_pod_sft_and_rl_share_the_context_policy():
  sft, rl = (config_util.load_config(POD[k]).data for k in ("sft", "rl"))
  for key in ("max_len", "overlap", "completion_tokens", "train_overlap"):
    assert sft[key] == rl[key], key


def test_pod_rl_config_is_the_launcher_default_and_renders(tmp_path):
  assert tpu.FLAGS["trainer_config"].default == POD["rl"]
  plan = tpu.build_plan(config_util.load_config("configs/glm45_air.py"), POD["rl"],
                        "gs://bkt/runs/r1",
                        tpu="v5p-256", server_tpu="v5p-8", servers=2,
                        server_arg="max_batch=64,max_len=32768", fleet=4, image="img:1")
  assert plan.mesh == {"data": 1, "fsdp": 16, "expert": 8, "tensor": 1,
                       "context": 1} and not plan.notes
  worker = plan.fleet[-1]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
  assert "--context_tokens=32768" in worker and "--context_overlap=2048" in worker
  r = subprocess.run(
      [sys.executable, "launch/tpu.py", "--config=configs/glm45_air.py", "--tpu=v5p-256",
       "--workdir=gs://bkt/runs/r1", "--init_checkpoint=gs://bkt/sft/checkpoints", "--dry_run",
       f"--trainer_config={POD['rl']}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 16, 'expert': 8, 'tensor': 1, 'context': 1}" in r.stdout
  assert f"--config={POD['rl']}" in r.stdout

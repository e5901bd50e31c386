"""launch/tpu.py + launch/k8s.py: slice shapes, mesh checks, per-host env, manifests, sweeps."""

import os
import subprocess
import sys

import pytest
import yaml

from klong_jax import config_util
from launch import k8s, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLM = os.path.join(ROOT, "configs", "glm45_air.py")
TRAINER = os.path.join(ROOT, "configs", "rl_glm45_air.py") + ":steps=200"
SFT_POD = os.path.join(ROOT, "configs", "sft_glm45_air.py")


def _plan(**kw):
  args = dict(trainer_spec=TRAINER, tpu="v5p-256", server_tpu="v5p-8", servers=2,
              server_arg="max_batch=64,max_len=32768", fleet=5, image="img:1")
  args.update(kw)
  preset = args.pop("preset", None) or config_util.load_config(GLM)
  return tpu.build_plan(preset, workdir=args.pop("workdir", "gs://bkt/runs/r1"), **args)


@pytest.mark.parametrize("name,chips,hosts", [
    ("v5p-256", 128, 32), ("v5p-8", 4, 1), ("v4-128", 64, 16), ("v6e-64", 64, 16),
    ("v5litepod-8", 8, 1), ("v6e-4", 4, 1)])
def test_parse_slice(name, chips, hosts):
  s = tpu.parse_slice(name)
  assert (s.chips, s.hosts) == (chips, hosts)


@pytest.mark.parametrize("bad", ["v9-8", "v5p", "tpu-256", "v5p-3"])
def test_parse_slice_rejects(bad):
  with pytest.raises(ValueError, match="v5p"):
    tpu.parse_slice(bad)


def test_glm_on_v5p_256_plan():
  plan = _plan()
  assert plan.mesh == {"data": 1, "fsdp": 16, "expert": 8, "tensor": 1, "context": 1}
  assert plan.trainer_slice.hosts == 32
  # One process per host, each with the env contract maybe_initialize_distributed reads.
  envs = [plan.host_env(h) for h in range(32)]
  assert [e["KLONG_PROCESS_ID"] for e in envs] == [str(h) for h in range(32)]
  assert {e["KLONG_NUM_PROCESSES"] for e in envs} == {"32"}
  assert {e["KLONG_COORDINATOR"] for e in envs} == {"${COORDINATOR}:8476"}
  argv = plan.trainer.executable.argv("python3")
  assert argv[:3] == ["python3", "-m", "klong_jax.rl.train"]
  # The pod RL config starts as it is: its batch divides over the batch axes (no override).
  assert not any("data.batch_size" in a for a in argv) and not plan.notes
  # The merged model section keeps the pod config's remat full and MoE chunk (the TPU plans'
  # assumptions): the preset's own defaults used to send remat none to the trainer.
  assert not any(a.startswith("--config.model.remat_policy") for a in argv)
  assert not any(a.startswith("--config.model.moe_token_chunk") for a in argv)
  assert "start-up checks passed" in plan.checks and "--topology=v5p-256" in plan.checks
  # Run state is used as gs:// natively (no gcsfuse): trainer, servers and workers alike.
  assert "--workdir=gs://bkt/runs/r1" in argv and "--stream=gs://bkt/runs/r1/stream" in argv
  assert "--policy_dir=gs://bkt/runs/r1/policy" in plan.servers[0].executable.argv()
  files = plan.files()
  assert len(files["trainer_hosts.txt"].splitlines()) == 32
  assert "KLONG_PROCESS_ID=31 " in files["trainer_hosts.txt"]
  script = files["launch.sh"]
  for needle in ("--accelerator-type=v5p-256", "--worker=all", "for i in $(seq 0 31)",
                 "--accelerator-type=v5p-8", "KLONG_SERVER_1=", "kubectl apply"):
    assert needle in script, needle
  r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert r.returncode == 0, r.stderr


def test_fleet_manifests():
  plan = _plan(fleet=5, site=tpu.Site(sandbox_runtime="docker-socket"))
  docs = list(yaml.safe_load_all(k8s.to_yaml(plan.fleet)))
  assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "Deployment", "Deployment"]
  deps = docs[2:]
  assert [d["spec"]["replicas"] for d in deps] == [3, 2]  # 5 pods over 2 servers
  for i, d in enumerate(deps):
    pod = d["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod
    assert {v["name"] for v in pod["volumes"]} == {"gcs", "docker-sock"}
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    cmd = pod["containers"][0]["command"][-1]
    assert f"--server=http://${{KLONG_SERVER_{i}}}:8000/v1" in cmd
    assert "--backend=docker" in cmd and "klong_jax.sandbox.image --ensure" in cmd
    assert "--stream=gs://bkt/runs/r1/stream" in cmd and "--worker=$(WORKER_POD)" in cmd
    assert "--tasks=/gcs/runs/r1/tasks/train" in cmd  # read-only inputs via the mount
    assert pod["containers"][0]["volumeMounts"][0] == {"name": "gcs", "mountPath": "/gcs",
                                                       "readOnly": True}
    assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("runtime,klass,backend", [("sysbox", "sysbox-runc", "docker"),
                                                   ("gvisor", "gvisor", "local")])
def test_sandbox_runtimes(runtime, klass, backend):
  plan = _plan(fleet=2, servers=1, site=tpu.Site(sandbox_runtime=runtime))
  dep = [o for o in plan.fleet if o["kind"] == "Deployment"][0]
  pod = dep["spec"]["template"]["spec"]
  assert pod["runtimeClassName"] == klass
  assert all(v["name"] != "docker-sock" for v in pod["volumes"])
  assert f"--backend={backend}" in pod["containers"][0]["command"][-1]


def test_bad_inputs_name_the_fix():
  with pytest.raises(ValueError, match="gs://BUCKET"):
    _plan(workdir="/local/dir")
  with pytest.raises(ValueError, match="v5p-32.*no serving config"):
    _plan(server_tpu="v5p-32")
  with pytest.raises(ValueError, match="do not divide 128 devices"):
    _plan(overrides={"mesh.expert": 3})  # 3 does not divide 128 chips
  with pytest.raises(ValueError, match="num_experts"):
    _plan(tpu="v5p-512", overrides={"mesh.expert": 256})  # 256 experts-axis > 128 experts
  # The trainer's own divisibility check: 8 kv heads over tensor=16 fails here, not at start-up.
  with pytest.raises(ValueError, match="num_kv_heads=8"):
    _plan(overrides={"mesh.tensor": 16})
  with pytest.raises(KeyError, match="no field"):
    _plan(overrides={"rl.not_a_field": 1})
  with pytest.raises(ValueError, match="runtime"):
    k8s.FleetSpec(name="x", image="i", replicas=1, bucket="b", runtime="kata")


@pytest.mark.parametrize("tpu_type", ["v5p-256", "v5p-128"])
def test_pod_configs_pass_the_start_up_checks(tpu_type):
  """Both pod configs as they are (fsdp=-1 x expert=8) pass the checks `--dry_run` runs."""
  s = tpu.parse_slice(tpu_type)
  for spec in (SFT_POD, TRAINER):
    assert "start-up checks passed" in tpu.validate(config_util.load_config(spec), s)


def test_a_batch_that_cannot_start_is_refused_with_the_fix():
  # 32 rows over data x fsdp x expert = 128 chips: the configs' old default.
  with pytest.raises(ValueError, match=r"data.batch_size=32 does not divide over the batch mesh "
                     r"axes data\*fsdp\*expert = 128 devices.*use data.batch_size=128"):
    _plan(overrides={"data.batch_size": 32})
  # 128 rows are 4 RL minibatches of 32: each must still divide over the 128 chips.
  with pytest.raises(ValueError, match=r"RL minibatch of data.batch_size / rl.minibatches = "
                     r"128/4 = 32 rows.*use data.batch_size=512"):
    _plan(overrides={"data.batch_size": 128})
  # Moving devices to the tensor axis makes 128 rows (32 per minibatch) start.
  plan = _plan(overrides={"data.batch_size": 128, "mesh.tensor": 4})
  assert plan.mesh == {"data": 1, "fsdp": 4, "expert": 8, "tensor": 4, "context": 1}
  with pytest.raises(ValueError, match="data.batch_size=32 does not divide"):
    tpu.validate(config_util.load_config(SFT_POD, "batch=32"), tpu.parse_slice("v5p-256"))


@pytest.mark.subprocess
def test_cli_dry_run_refuses_a_bad_batch():
  r = subprocess.run(
      [sys.executable, "launch/tpu.py", "--config=configs/glm45_air.py", "--tpu=v5p-256",
       "--workdir=gs://bkt/runs/r1", "--dry_run", "--trainer_config=configs/rl_glm45_air.py",
       "--sweep=data.batch_size=32"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "use data.batch_size=128" in r.stderr, r.stderr[-2000:]


def test_servers_on_a_two_host_slice_run_one_process_per_host():
  plan = _plan(server_tpu="v5p-16", server_arg="")
  assert plan.server_slice.hosts == 2 and "slice=v5p-16" in plan.checks
  files = plan.files()
  lines = files["server_hosts.txt"].splitlines()
  assert len(lines) == 4  # 2 servers x 2 hosts.
  for i in range(2):
    for h in range(2):
      cmd = plan.server_host_command(i, h)
      assert cmd in lines
      assert (f"KLONG_COORDINATOR=${{KLONG_SERVER_{i}}}:8476 KLONG_NUM_PROCESSES=2 "
              f"KLONG_PROCESS_ID={h} python3 -m klong_jax.inference.server") in cmd
      assert "--config=configs/serve_glm45_air.py:slice=v5p-16" in cmd
  script = files["launch.sh"]
  for needle in ("--accelerator-type=v5p-16", "for h in $(seq 0 1)",
                 "KLONG_COORDINATOR=$KLONG_SERVER_1:8476 KLONG_NUM_PROCESSES=2 "
                 "KLONG_PROCESS_ID=$h $SERVER_CMD"):
    assert needle in script, needle
  r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert r.returncode == 0, r.stderr
  text = plan.describe()
  assert "2 hosts: one process per host, process 0 serves HTTP" in text
  assert "[server1 host 1: follower, no HTTP] cd ~/klong-jax && KLONG_COORDINATOR" in text
  # A single-host slice keeps one plain process per server (no distributed env).
  single = _plan()
  assert "server_hosts.txt" not in single.files()
  assert "KLONG_COORDINATOR" not in single.server_host_command(0, 0)


def test_sweep_work_units():
  preset = config_util.load_config(GLM)
  plans = tpu.sweep_plans(preset, "gs://bkt/sweep", ["rl.kl_coef=0.02", "mesh.expert=16"],
                          trainer_spec=TRAINER, tpu="v5p-256", server_tpu="v5p-8", servers=1,
                          server_arg="", fleet=2, image="img")
  assert [p.name for p in plans] == ["klong-glm45-air-wu0", "klong-glm45-air-wu1"]
  assert [p.workdir for p in plans] == ["gs://bkt/sweep/wu0", "gs://bkt/sweep/wu1"]
  a0, a1 = (p.trainer.executable.argv() for p in plans)
  assert "--config.rl.kl_coef=0.02" in a0 and "--config.rl.kl_coef=0.02" not in a1
  assert plans[1].mesh["expert"] == 16 and plans[1].mesh["fsdp"] == 8
  assert plans[0].mesh["expert"] == 8


def test_write_plan(tmp_path):
  plan = _plan(fleet=1, servers=1)
  paths = tpu.write_plan(plan, str(tmp_path / "out"))
  names = sorted(os.listdir(tmp_path / "out"))
  assert names == ["fleet.yaml", "launch.sh", "plan.txt", "trainer_hosts.txt"]  # no temp files
  assert len(paths) == 4 and os.access(tmp_path / "out" / "launch.sh", os.X_OK)
  assert list(yaml.safe_load_all((tmp_path / "out" / "fleet.yaml").read_text()))[-1]["kind"] == \
      "Deployment"


@pytest.mark.subprocess
def test_cli_dry_run():
  r = subprocess.run(
      [sys.executable, "launch/tpu.py", "--config=configs/glm45_air.py", "--tpu=v5p-256",
       "--workdir=gs://bkt/runs/r1", "--dry_run", "--sweep=rl.kl_coef=0.02",
       "--sweep=rl.kl_coef=0.05"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert out.count("=== work unit") == 2
  assert "mesh {'data': 1, 'fsdp': 16, 'expert': 8, 'tensor': 1, 'context': 1}" in out
  assert "32 hosts x 4 chips" in out and "kind: Deployment" in out
  assert out.count("start-up checks passed") == 2
  assert "wrote " not in out  # dry run writes nothing


def test_sft_pod_config_plans_the_sft_trainer_alone(tmp_path):
  """The SFT pod config through the same launcher: per-host `train.sft --resume`, no servers."""
  plan = _plan(trainer_spec=SFT_POD, workdir="gs://bkt/runs/sft1")
  argv = plan.trainer.executable.argv("python3")
  assert argv[:3] == ["python3", "-m", "klong_jax.train.sft"]
  assert "--workdir=gs://bkt/runs/sft1" in argv and "--resume" in argv
  assert not any(a.startswith("--stream") or "data.batch_size" in a for a in argv)
  assert plan.servers == [] and plan.fleet == [] and plan.trainer_slice.hosts == 32
  assert "--step=sft" in plan.checks and "start-up checks passed" in plan.checks
  text = plan.describe()
  assert "KLONG_PROCESS_ID=31 python3 -m klong_jax.train.sft" in text and "servers, rollout" in text
  script = plan.launch_script()
  assert "klong_jax.train.sft" in script and "kubectl" not in script and "server" not in script
  assert sorted(os.path.basename(p) for p in tpu.write_plan(plan, str(tmp_path))) == \
      ["launch.sh", "plan.txt", "trainer_hosts.txt"]


def test_cli_dry_run_sft_pod_config():
  r = subprocess.run(
      [sys.executable, "launch/tpu.py", "--config=configs/glm45_air.py", "--tpu=v5p-256",
       "--trainer_config=configs/sft_glm45_air.py", "--workdir=gs://bkt/runs/sft1", "--dry_run"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "start-up checks passed" in r.stdout and "fleet.yaml" not in r.stdout

"""Plan a pod run: multi-host RL trainer on a TPU slice, servers on their own slices, k8s fleet
(or, with an SFT `--trainer_config`, the multi-host SFT trainer alone).

  python launch/tpu.py --config=configs/glm45_air.py --tpu=v5p-256 --workdir=gs://BUCKET/runs/r1 \\
      --init_checkpoint=gs://BUCKET/ckpt/glm45_air_sft --dry_run [--sweep=rl.kl_coef=0.02 ...]

`--config` is a model preset (model + mesh sections); the trainer's other sections come from
`--trainer_config` (default configs/rl_glm45_air.py, the pod RL config), and every field where the
merged config differs from the trainer config is passed as `--config.k=v`. The mesh is resolved
against the slice's chip count here, so a bad mesh fails before anything is created. One trainer
process runs per TPU host with KLONG_COORDINATOR / KLONG_NUM_PROCESSES / KLONG_PROCESS_ID set
(klong_jax.parallel.mesh.maybe_initialize_distributed). Each inference server replica gets its own
slice (`--server_tpu`); on a multi-host slice (v5p-16) it is one process per host under the same
env contract, process 0 serving HTTP (klong_jax/inference/multihost.py); the CPU rollout fleet is
Kubernetes Deployments (launch/k8s.py).
All run state lives in one GCS bucket and is used as `gs://` paths natively (no gcsfuse): the
trajectory stream (claims by GCS preconditions, klong_jax/rollout/gcs_stream.py), policy versions
(commit object) and Orbax checkpoints (etils.epath + tensorstore). Only read-only inputs (task dirs,
tokenizer) are read through a gcsfuse mount at /gcs on server hosts and worker pods.

Nothing is called: `--dry_run` prints the plan; otherwise the plan is written to `--out`
(launch.sh with the gcloud/kubectl commands, fleet.yaml, plan.txt) for a person to run.
Sweeps as in xmanager: each `--sweep=k=v,k=v` is one work unit (its own slices and run dir).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from typing import Any

if __package__ in (None, ""):  # `python launch/tpu.py`: make the repo root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from klong_jax import config_util  # noqa: E402
from klong_jax.launch import checks  # noqa: E402
from klong_jax.launch import experiment as xp  # noqa: E402
from klong_jax.parallel import rules as rules_lib  # noqa: E402
from klong_jax.parallel.mesh import MESH_AXES, mesh_shape  # noqa: E402
from launch import k8s, local  # noqa: E402  (local: --config/--workdir/--dry_run/--sweep flags)

FLAGS = flags.FLAGS
_TPU = flags.DEFINE_string("tpu", "v5p-256", "Trainer slice accelerator type (e.g. v5p-256).")
_SERVER_TPU = flags.DEFINE_string("server_tpu", "v5p-8", "Slice per server replica (multi-host: "
                                  "one server process per host, process 0 serves HTTP).")
_SERVERS = flags.DEFINE_integer("servers", 2, "Inference server replicas (one slice each).")
_SERVER_ARG = flags.DEFINE_string("server_arg", "",
                                  "Arg string overrides for the server config: configs/"
                                  "serve_<preset>.py:slice=<server_tpu> where it exists (sizes "
                                  "planned per slice), else configs/serve_tiny.py:preset=<preset>.")
_TRAINER_CONFIG = flags.DEFINE_string(
    "trainer_config", "configs/rl_glm45_air.py",
    "Trainer config giving every section but model and mesh: an RL config (trainer, servers, "
    "fleet) or an SFT config, i.e. one without an `rl` section (the SFT trainer alone).")
_FLEET = flags.DEFINE_integer("fleet", 64, "Rollout worker pods in total.")
_RUNTIME = flags.DEFINE_enum("sandbox_runtime", "sysbox", sorted(k8s.RUNTIMES),
                             "How worker pods run task sandboxes (see launch/k8s.py).")
_IMAGE = flags.DEFINE_string("image", "us-docker.pkg.dev/PROJECT/klong/fleet:latest",
                             "Fleet image (klong-jax[fleet] + the sandbox image preloaded).")
_ZONE = flags.DEFINE_string("zone", "us-east5-a", "TPU zone.")
_RUNTIME_VERSION = flags.DEFINE_string("tpu_runtime", "v2-alpha-tpuv5", "TPU VM software version.")
_REPO = flags.DEFINE_string("repo_dir", "~/klong-jax", "Checkout on every TPU host.")
_OUT = flags.DEFINE_string("out", "", "Where to write the plan files (default runs/launch).")

COORDINATOR_PORT = 8476
SERVER_PORT = 8000

# version -> (TensorCores per chip in the accelerator name, chips per host).
TPU_VERSIONS = {"v4": (2, 4), "v5p": (2, 4), "v5litepod": (1, 4), "v5e": (1, 4), "v6e": (1, 4)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice shape: accelerator type, chips, hosts (one JAX process each)."""

  accelerator: str
  chips: int
  hosts: int

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts


def parse_slice(accelerator: str) -> Slice:
  """'v5p-256' -> 128 chips on 32 hosts (v4/v5p names count TensorCores, 2 per chip)."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
  if not m or m.group(1) not in TPU_VERSIONS:
    raise ValueError(f"TPU type {accelerator!r} not understood; use e.g. v5p-256, v4-128, v6e-64 "
                     f"(versions {sorted(TPU_VERSIONS)})")
  cores_per_chip, per_host = TPU_VERSIONS[m.group(1)]
  count = int(m.group(2))
  if count % cores_per_chip:
    raise ValueError(f"{accelerator}: {count} is not a whole number of chips")
  chips = count // cores_per_chip
  if chips <= 8 and cores_per_chip == 1:
    return Slice(accelerator, chips, 1)  # v5e/v6e up to 8 chips: one host.
  if chips % per_host:
    raise ValueError(f"{accelerator}: {chips} chips do not fill whole hosts of {per_host}")
  return Slice(accelerator, chips, max(1, chips // per_host))


def resolve_mesh(mesh: Any, chips: int) -> dict[str, int]:
  """Axis sizes (-1 resolved) checked against the slice; errors name the axis and the fix."""
  sizes = mesh.to_dict() if hasattr(mesh, "to_dict") else dict(mesh)
  return dict(zip(MESH_AXES, mesh_shape(sizes, chips), strict=True))


def validate(config: ml_collections.ConfigDict, trainer_slice: Slice,
             mesh: dict[str, int] | None = None) -> str:
  """The plan's start-up checks (klong_jax/launch/checks.py, the trainer's rules table) for a
  trainer config (SFT or RL) on a slice: mesh vs chips, experts/heads vs their axes, rows (per
  PPO minibatch) vs data x fsdp x expert, rows vs hosts. Raises StartupError naming the fix, so a
  plan that passes cannot fail the trainer's own checks at its first step; returns a summary."""
  mesh = mesh or resolve_mesh(config.mesh, trainer_slice.chips)
  rules = tuple(config.get("rules") or rules_lib.LOGICAL_RULES)
  batch = int(config.data.batch_size)
  checks.check_startable(config.model, mesh, batch, chips=trainer_slice.chips,
                         where=trainer_slice.accelerator, rules=rules, rl=config.get("rl"))
  if batch % trainer_slice.hosts:
    raise checks.StartupError(
        f"data.batch_size={batch} does not split over the {trainer_slice.hosts} hosts of "
        f"{trainer_slice.accelerator} (each loads an equal share); use a multiple of "
        f"{trainer_slice.hosts}")
  return (f"start-up checks passed: mesh product {trainer_slice.chips} = chips, "
          f"data.batch_size={batch} over the batch axes ({checks.batch_axes(mesh, rules)[1]} "
          "devices), model dims over their axes")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(base: ml_collections.ConfigDict, merged: ml_collections.ConfigDict
                ) -> dict[str, Any]:
  """Leaves of `merged` that differ from `base`, as {'config.a.b': value} override flags."""
  b, m = _flat(base.to_dict()), _flat(merged.to_dict())
  missing = sorted(set(b) - set(m))
  if missing:
    raise ValueError(f"merged config lost fields {missing[:5]}; overrides cannot remove fields")
  return {f"config.{k}": v for k, v in m.items() if k not in b or b[k] != v}


@dataclasses.dataclass(frozen=True)
class Site:
  """Where the plan runs: TPU zone and software version, checkout dir, fleet sandbox runtime."""

  zone: str = "us-east5-a"
  tpu_runtime: str = "v2-alpha-tpuv5"
  repo_dir: str = "~/klong-jax"
  sandbox_runtime: str = "sysbox"


def dist_env(coordinator_host: str, processes: int, process_id: int | str) -> dict[str, str]:
  """The multi-host env contract parallel/mesh.maybe_initialize_distributed reads (trainers and
  multi-host servers alike); the host and id may be shell variables."""
  return {"KLONG_COORDINATOR": f"{coordinator_host}:{COORDINATOR_PORT}",
          "KLONG_NUM_PROCESSES": str(processes), "KLONG_PROCESS_ID": str(process_id)}


def env_prefix(env: dict[str, str]) -> str:
  """`K=V K=V ` for a shell command line."""
  return "".join(f"{k}={v} " for k, v in env.items())


@dataclasses.dataclass
class PodPlan:
  """One work unit on a pod: slices, per-host trainer commands, servers, fleet manifests."""

  name: str
  workdir: str
  trainer_slice: Slice
  mesh: dict[str, int]
  trainer: xp.Job
  servers: list[xp.Job]
  server_slice: Slice
  fleet: list[dict[str, Any]]
  bucket: str
  site: Site = Site()
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  checks: str = ""  # What `validate` checked (the plan's start-up checks).

  def host_env(self, host: int) -> dict[str, str]:
    """The multi-host env contract for trainer process `host` ($COORDINATOR is worker 0's IP)."""
    return dist_env("${COORDINATOR}", self.trainer_slice.hosts, host)

  def host_command(self, host: int) -> str:
    return (f"cd {self.site.repo_dir} && {env_prefix(self.host_env(host))}"
            f"{shlex.join(self.trainer.executable.argv('python3'))}")

  def server_host_command(self, server: int, host: int) -> str:
    """Server replica `server`'s command on host `host` of its slice. Multi-host slices: one
    process per host joined by jax.distributed (the coordinator is its worker 0, whose IP
    launch.sh exports as $KLONG_SERVER_<server>); process 0 serves HTTP and schedules, the others
    run the device calls it announces (inference/multihost.py) and bind no port."""
    cmd = f"cd {self.site.repo_dir} && "
    hosts = self.server_slice.hosts
    if hosts > 1:
      cmd += env_prefix(dist_env(f"${{KLONG_SERVER_{server}}}", hosts, host))
    return cmd + shlex.join(self.servers[server].executable.argv("python3"))

  def launch_script(self) -> str:
    """Every gcloud / kubectl command, in order (written as launch.sh)."""
    t, z = self.trainer_slice, self.site.zone
    tname = f"{self.name}-trainer"
    # Read-only inputs (tokenizer) through gcsfuse on the servers; the trainer needs no mount.
    mount = (f"mkdir -p {k8s.STREAM_MOUNT} && gcsfuse --implicit-dirs -o ro {self.bucket} "
             f"{k8s.STREAM_MOUNT}")
    lines = ["#!/bin/bash", f"# klong-jax pod run {self.name}: generated by launch/tpu.py",
             "set -euo pipefail", "",
             f"# 1. Trainer slice {t.accelerator}: {t.chips} chips on {t.hosts} hosts, "
             f"mesh {self.mesh}.",
             f"gcloud compute tpus tpu-vm create {tname} --zone={z} "
             f"--accelerator-type={t.accelerator} --version={self.site.tpu_runtime}",
             f"gcloud compute tpus tpu-vm ssh {tname} --zone={z} --worker=all --command="
             + shlex.quote(f"cd {self.site.repo_dir} && pip install -e '.[tpu]'"),
             f"COORDINATOR=$(gcloud compute tpus tpu-vm describe {tname} --zone={z} "
             "--format='value(networkEndpoints[0].ipAddress)')", "",
             f"# 2. One trainer process per host (KLONG_PROCESS_ID 0..{t.hosts - 1}; every "
             "command in trainer_hosts.txt).",
             f"TRAINER_CMD={shlex.quote(shlex.join(self.trainer.executable.argv('python3')))}",
             f"for i in $(seq 0 {t.hosts - 1}); do",
             f"  gcloud compute tpus tpu-vm ssh {tname} --zone={z} --worker=$i --command=\"cd "
             f"{self.site.repo_dir} && {env_prefix(dist_env('$COORDINATOR', t.hosts, '$i'))}"
             "$TRAINER_CMD > /tmp/trainer.log "
             "2>&1\" &", "done", ""]
    if not self.servers and not self.fleet:  # An SFT plan: the trainer is the whole run.
      return "\n".join([*lines, "wait", ""])
    lines.append(f"# 3. {len(self.servers)} inference server(s), one "
                 f"{self.server_slice.accelerator} slice each, hot-reloading the trainer's "
                 "policy dir.")
    hosts = self.server_slice.hosts
    if hosts > 1:
      lines.append(f"# Each server spans the {hosts} hosts of its slice: one process per host "
                   f"(KLONG_PROCESS_ID 0..{hosts - 1}, every command in server_hosts.txt); "
                   "process 0 (worker 0) serves HTTP.")
    for i, s in enumerate(self.servers):
      sname = f"{self.name}-{s.name}"
      lines += [f"gcloud compute tpus tpu-vm create {sname} --zone={z} "
                f"--accelerator-type={self.server_slice.accelerator} "
                f"--version={self.site.tpu_runtime}",
                f"gcloud compute tpus tpu-vm ssh {sname} --zone={z} --worker=all --command="
                + shlex.quote(f"cd {self.site.repo_dir} && pip install -e '.[tpu]' && {mount}"),
                f"export KLONG_SERVER_{i}=$(gcloud compute tpus tpu-vm describe {sname} --zone={z} "
                "--format='value(networkEndpoints[0].ipAddress)')"]
      if hosts == 1:
        lines.append(f"gcloud compute tpus tpu-vm ssh {sname} --zone={z} --worker=all "
                     f"--command=\"{self.server_host_command(i, 0)} > /tmp/server.log 2>&1\" &")
        continue
      cmd = shlex.join(s.executable.argv("python3"))
      lines += [f"SERVER_CMD={shlex.quote(cmd)}",
                f"for h in $(seq 0 {hosts - 1}); do",
                f"  gcloud compute tpus tpu-vm ssh {sname} --zone={z} --worker=$h --command=\"cd "
                f"{self.site.repo_dir} && "
                f"{env_prefix(dist_env(f'$KLONG_SERVER_{i}', hosts, '$h'))}$SERVER_CMD "
                "> /tmp/server.log "
                "2>&1\" &", "done"]
    lines += ["", "# 4. CPU rollout fleet (server IPs substituted into the manifests).",
              'envsubst < "$(dirname "$0")/fleet.yaml" | kubectl apply -f -', "", "wait", ""]
    return "\n".join(lines)

  def describe(self) -> str:
    """The dry-run text: slices, mesh, per-host commands, servers, fleet summary."""
    t = self.trainer_slice
    out = [f"work unit {self.name}: workdir {self.workdir}"]
    if self.overrides:
      out.append(f"  overrides: {self.overrides}")
    out += [f"  note: {n}" for n in self.notes]
    if self.checks:
      out.append(f"  {self.checks}")
    out += [f"  trainer slice {t.accelerator}: {t.chips} chips, {t.hosts} hosts x "
            f"{t.chips_per_host} chips; mesh {self.mesh} (product {t.chips})",
            "  per-host trainer commands (jax.distributed.initialize from the KLONG_* env):"]
    shown = range(t.hosts) if t.hosts <= 4 else [0, 1, t.hosts - 1]
    for h in shown:
      out.append(f"    [host {h}] {self.host_command(h)}")
      if t.hosts > 4 and h == 1:
        out.append(f"    ... hosts 2..{t.hosts - 2} identical but KLONG_PROCESS_ID ...")
    if not self.servers and not self.fleet:
      out.append("  servers, rollout fleet: none (an SFT run: the trainer alone)")
      return "\n".join(out)
    hosts = self.server_slice.hosts
    out.append(f"  servers: {len(self.servers)} x {self.server_slice.accelerator} "
               f"({self.server_slice.chips} chips each"
               + (f", {hosts} hosts: one process per host, process 0 serves HTTP)" if hosts > 1
                  else ")"))
    for i, s in enumerate(self.servers):
      if hosts == 1:
        out.append(f"    [{s.name}] {shlex.join(s.executable.argv('python3'))}")
        continue
      for h in range(hosts):
        role = "HTTP + scheduler" if h == 0 else "follower, no HTTP"
        out.append(f"    [{s.name} host {h}: {role}] {self.server_host_command(i, h)}")
    deps = [o for o in self.fleet if o["kind"] == "Deployment"]
    pod = deps[0]["spec"]["template"]["spec"]
    out.append(f"  rollout fleet: {sum(d['spec']['replicas'] for d in deps)} worker pods in "
               f"{len(deps)} Deployment(s), runtime {self.site.sandbox_runtime} "
               f"(runtimeClassName {pod.get('runtimeClassName', 'default')}), image "
               f"{pod['containers'][0]['image']}")
    out.append(f"    worker pod command: {pod['containers'][0]['command'][-1]}")
    return "\n".join(out)

  def files(self) -> dict[str, str]:
    """File name -> text, as written by `write_plan`."""
    hosts = "\n".join(self.host_command(h) for h in range(self.trainer_slice.hosts))
    files = {"plan.txt": self.describe() + "\n", "launch.sh": self.launch_script(),
             "trainer_hosts.txt": hosts + "\n"}
    if self.fleet:
      files["fleet.yaml"] = k8s.to_yaml(self.fleet)
    if self.servers and self.server_slice.hosts > 1:
      files["server_hosts.txt"] = "".join(
          f"{self.server_host_command(i, h)}\n" for i in range(len(self.servers))
          for h in range(self.server_slice.hosts))
    return files


def gcs_bucket(workdir: str) -> tuple[str, str]:
  """'gs://b/runs/x' -> ('b', '/gcs/runs/x'): the bucket and its read-only gcsfuse mount path."""
  m = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]*)(/.*)?", workdir.rstrip("/"))
  if not m:
    raise ValueError(f"--workdir={workdir!r}: a pod run keeps its state in GCS; use gs://BUCKET/path")
  return m.group(1), k8s.STREAM_MOUNT + (m.group(2) or "")


def server_config_spec(preset: str, server_tpu: str, server_arg: str = "") -> tuple[str, str]:
  """(the servers' --config, a note): configs/serve_<preset>.py:slice=<server_tpu> (bf16, serving
  mesh, cache sized by the slice's TPU-compiler plan), else configs/serve_tiny.py:preset=..."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  own = f"configs/serve_{preset}.py"
  path = os.path.join(repo, own)
  per_slice = os.path.exists(path) and "\nSLICES = " in open(path, encoding="utf-8").read()
  if not per_slice:  # (configs/serve_tiny.py is the generic one: preset=, no slice table.)
    spec = f"configs/serve_tiny.py:preset={preset},{server_arg}".rstrip(",")
    return spec, f"servers: {spec} (no per-slice serving config for {preset})"
  spec = f"{own}:slice={server_tpu},{server_arg}".rstrip(",")
  config = config_util.load_config(os.path.join(repo, spec))  # Names the slices it knows.
  sizes = dict(zip(MESH_AXES, mesh_shape(config.mesh.to_dict(), parse_slice(server_tpu).chips),
                   strict=True))
  checks.check_batch(config.serve.max_batch, sizes, rules_lib.resolve_rules(config.rules),
                     field="serve.max_batch")
  if parse_slice(server_tpu).hosts > 1 and config.serve.engine != "paged":
    raise ValueError(f"{spec}: serve.engine={config.serve.engine!r} on the multi-host slice "
                     f"{server_tpu}; only the paged engine runs multi-host (one process per host "
                     "following process 0): set engine 'paged' for this slice")
  return spec, (f"servers: {spec}, mesh {sizes}, checked; serving memory plan: python -m "
                f"klong_jax.launch.plan --config={spec} --topology={server_tpu} --step=serve")


def build_plan(preset: ml_collections.ConfigDict, trainer_spec: str, workdir: str, *,
               tpu: str, server_tpu: str, servers: int, server_arg: str, fleet: int,
               image: str, site: Site = Site(), init_checkpoint: str = "", tokenizer: str = "",
               tasks: str = "", overrides: dict[str, Any] | None = None, name: str = ""
               ) -> PodPlan:
  """The whole pod plan for one work unit (pure: reads config files, calls nothing)."""
  bucket, root = gcs_bucket(workdir)  # root: the gcsfuse view, for read-only inputs only
  run = workdir.rstrip("/")           # run state: gs:// natively
  trainer_slice = parse_slice(tpu)
  server_slice = parse_slice(server_tpu)
  base = config_util.load_config(trainer_spec)
  merged = ml_collections.ConfigDict(base.to_dict())
  merged.model = ml_collections.ConfigDict(preset.model.to_dict())
  merged.mesh = ml_collections.ConfigDict(preset.mesh.to_dict())
  merged = local.apply_overrides(merged, overrides or {})
  mesh = resolve_mesh(merged.mesh, trainer_slice.chips)
  phase = "rl" if "rl" in merged else "sft"
  checked = (validate(merged, trainer_slice, mesh) + f"; memory plan: python -m "
             f"klong_jax.launch.plan --config={trainer_spec} "
             f"--topology={trainer_slice.accelerator} --step={phase}")
  name = name or f"klong-{re.sub(r'[^a-z0-9-]', '-', preset.model.get('name', 'run').lower())}"
  if phase == "sft":  # The SFT trainer alone: no servers, no fleet; a restarted host resumes.
    trainer = xp.Job("trainer", xp.Executable("klong_jax.train.sft", {
        "config": trainer_spec, "workdir": run, "resume": True, **config_diff(base, merged)}),
        primary=True)
    return PodPlan(name=name, workdir=workdir, trainer_slice=trainer_slice, mesh=mesh,
                   trainer=trainer, servers=[], server_slice=server_slice, fleet=[],
                   bucket=bucket, site=site, overrides=dict(overrides or {}), checks=checked)
  stream, policy = f"{run}/stream", f"{run}/policy"
  tok = tokenizer or f"{root}/tokenizer.model"
  task_dir = tasks or f"{root}/tasks/train"
  model_name = name
  trainer = xp.Job("trainer", xp.Executable("klong_jax.rl.train", {
      "config": trainer_spec, "workdir": run, "stream": stream,
      "init_checkpoint": init_checkpoint or None, **config_diff(base, merged)}), primary=True)
  preset_name = _preset_name(merged.model)
  server_config, serve_note = server_config_spec(preset_name, server_slice.accelerator,
                                                 server_arg)
  checked += f"; {serve_note}"
  server_jobs = [xp.Job(f"server{i}", xp.Executable("klong_jax.inference.server", {
      "config": server_config,
      "policy_dir": policy, "host": "0.0.0.0", "port": SERVER_PORT,
      "config.serve.host": "0.0.0.0", "config.serve.port": SERVER_PORT,
      "config.serve.tokenizer": tok, "config.serve.model_name": model_name}),
      ready=f"http://$KLONG_SERVER_{i}:{SERVER_PORT}/health") for i in range(servers)]
  runtime = site.sandbox_runtime
  spec = k8s.FleetSpec(name=name, image=image, replicas=fleet, bucket=bucket, runtime=runtime)
  objs: list[dict[str, Any]] = [k8s.namespace(spec), k8s.service_account(spec)]
  ctx = merged.get("workers", {})
  for i, n in enumerate(k8s.split_replicas(fleet, servers)):
    if n == 0:
      continue
    args = xp.Executable("klong_jax.rollout.worker", {
        "server": f"http://${{KLONG_SERVER_{i}}}:{SERVER_PORT}/v1", "tasks": task_dir,
        "stream": stream, "tokenizer": tok, "model": model_name, "backend": k8s.backend(runtime),
        # The pod name (kubelet expands $(VAR)): a restarted container reclaims its groups at
        # once; a replaced pod's claims expire after --claim_lease_s and are re-run elsewhere.
        "worker": "$(WORKER_POD)",
        "group_size": ctx.get("group_size", 8), "rounds": 1_000_000, "num_workers": 1,
        "max_steps": ctx.get("max_steps", 1000),
        "time_limit_s": ctx.get("time_limit_s", 7200.0),
        # Episode checkpoints in the bucket: a restarted or replacing pod resumes the rollout.
        "ckpt_every_s": ctx.get("ckpt_every_s", 600.0),
        # The clock of the stage limits (agent/budget.py) and the token clock's rates.
        **{k: ctx[k] for k in xp.BUDGET_FLAGS if k in ctx},
        # The trainer's context policy and temperature: chunks = the contexts sampled under.
        "context_tokens": merged.data.max_len, "context_overlap": merged.data.overlap,
        "max_completion_tokens": merged.data.completion_tokens,
        "temperature": merged.rl.temperature}).argv("python3")
    objs.append(k8s.worker_deployment(spec, f"{name}-workers-s{i}", n, args))
  return PodPlan(name=name, workdir=workdir, trainer_slice=trainer_slice, mesh=mesh,
                 trainer=trainer, servers=server_jobs, server_slice=server_slice, fleet=objs,
                 bucket=bucket, site=site, overrides=dict(overrides or {}), checks=checked)


def _preset_name(model: ml_collections.ConfigDict) -> str:
  """The model preset (klong_jax/model/config.py) whose shapes match `model` (server config)."""
  from configs import common  # noqa: PLC0415

  return common.preset_name(model)


def sweep_plans(preset: ml_collections.ConfigDict, workdir: str, sweep: list[str],
                **kw: Any) -> list[PodPlan]:
  """One PodPlan per `--sweep` override set (xmanager work units), each in `<workdir>/wu<i>`."""
  sets = [local.parse_overrides(s) for s in sweep] or [{}]
  plans = []
  for i, ov in enumerate(sets):
    wd = f"{workdir.rstrip('/')}/wu{i}" if sweep else workdir
    base = f"klong-{_preset_name(preset.model).replace('_', '-')}"
    plans.append(build_plan(preset, workdir=wd, overrides=ov,
                            name=f"{base}-wu{i}" if sweep else base, **kw))
  return plans


def write_plan(plan: PodPlan, out_dir: str) -> list[str]:
  """Writes the plan files (each to a temp name, then renamed); returns their paths."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for fname, text in plan.files().items():
    tmp = out / f".{fname}.tmp"
    tmp.write_text(text)
    tmp.rename(out / fname)
    if fname.endswith(".sh"):
      os.chmod(out / fname, 0o755) if not str(out).startswith("gs://") else None
    written.append(str(out / fname))
  return written


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config (a model preset, e.g. configs/glm45_air.py) and "
                         "--workdir=gs://BUCKET/path are required")
  try:
    plans = _plans()
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  _emit(plans)


def _plans() -> list[PodPlan]:
  return sweep_plans(
      FLAGS.config, FLAGS.workdir, FLAGS.sweep, trainer_spec=_TRAINER_CONFIG.value,
      tpu=_TPU.value, server_tpu=_SERVER_TPU.value, servers=_SERVERS.value,
      server_arg=_SERVER_ARG.value, fleet=_FLEET.value, image=_IMAGE.value,
      site=Site(zone=_ZONE.value, tpu_runtime=_RUNTIME_VERSION.value, repo_dir=_REPO.value,
                sandbox_runtime=_RUNTIME.value),
      init_checkpoint=FLAGS.init_checkpoint, tokenizer=FLAGS.tokenizer, tasks=FLAGS.tasks)


def _emit(plans: list[PodPlan]) -> None:
  """Prints (dry run) or writes each work unit's plan."""
  for i, plan in enumerate(plans):
    print(f"=== work unit {i + 1}/{len(plans)} ===")
    if FLAGS.dry_run:
      print(plan.describe())
      print("--- launch.sh ---")
      print(plan.launch_script())
      if plan.fleet:
        print("--- fleet.yaml ---")
        print(k8s.to_yaml(plan.fleet), flush=True)
      continue
    out = _OUT.value or os.path.join("runs", "launch")
    out = os.path.join(out, f"wu{i}") if len(plans) > 1 else out
    for path in write_plan(plan, out):
      print(f"wrote {path}")
    print(f"run it: bash {os.path.join(out, 'launch.sh')}", flush=True)


if __name__ == "__main__":
  app.run(main)

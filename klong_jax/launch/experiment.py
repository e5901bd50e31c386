"""xmanager-shaped experiment description (`Experiment -> Job -> Executable`) and a local runner.

xmanager itself is an optional heavy install (PLATFORM_NOTES), so this keeps its shape in plain
Python: an Executable is `python -m module --flags`, a Job names one role process with its
readiness check, an Experiment is the ordered jobs of one work unit. `run_local` starts the jobs
in order (each waits until ready), runs until the primary jobs exit, then stops the rest.
Builders here produce the demo's RL experiment (trainer + server + N workers) and its held-out
evaluation (server + N workers). JAX-free.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from klong_jax import config_util
from klong_jax.launch import procs


@dataclasses.dataclass
class Executable:
  """`python -m module [positional]` + absl flags (True -> --f, False -> --nof, list: repeat)."""

  module: str
  args: dict[str, Any] = dataclasses.field(default_factory=dict)
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  positional: tuple[str, ...] = ()   # e.g. a sub-command: `python -m klong_jax.factory distill`

  def argv(self, python: str = "") -> list[str]:
    out = [python or sys.executable, "-m", self.module, *self.positional]
    for k, v in self.args.items():
      if v is None:
        continue
      if isinstance(v, bool):
        out.append(f"--{k}" if v else f"--no{k}")
      elif isinstance(v, (list, tuple)):
        out.extend(f"--{k}={x}" for x in v)
      else:
        out.append(f"--{k}={v}")
    return out


@dataclasses.dataclass
class Job:
  """One role process: its executable, readiness (`http://...`, `file:PATH` or ''), and whether
  the experiment is over when it exits (`primary`)."""

  name: str
  executable: Executable
  ready: str = ""
  ready_timeout_s: float = 300.0
  primary: bool = False


@dataclasses.dataclass
class Experiment:
  """The ordered jobs of one work unit, with the directory its logs go to."""

  name: str
  workdir: str
  jobs: list[Job] = dataclasses.field(default_factory=list)
  python: str = ""

  def add(self, job: Job) -> Job:
    if any(j.name == job.name for j in self.jobs):
      raise ValueError(f"experiment {self.name!r} already has a job named {job.name!r}")
    self.jobs.append(job)
    return job

  @property
  def log_dir(self) -> str:
    return os.path.join(self.workdir, "logs")

  def describe(self) -> str:
    """What `run_local` would launch, one block per job (the dry-run output)."""
    lines = [f"experiment {self.name}: {len(self.jobs)} job(s), logs in {self.log_dir}"]
    for j in self.jobs:
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in j.executable.env.items())
      cmd = shlex.join(j.executable.argv(self.python))
      lines.append(f"  [{j.name}]{' (primary)' if j.primary else ''}"
                   f"{' ready: ' + j.ready if j.ready else ''}")
      lines.append(f"    {env + ' ' if env else ''}{cmd}")
    return "\n".join(lines)


def ready_check(spec: str) -> procs.ReadyCheck | None:
  """`http://...` -> HTTP 200 check; `file:PATH` -> existence check; '' -> None."""
  if not spec:
    return None
  if spec.startswith(("http://", "https://")):
    return procs.http_ready(spec)
  if spec.startswith("file:"):
    return procs.file_ready(spec[len("file:"):])
  raise ValueError(f"ready spec {spec!r} must start with http://, https:// or file:")


def run_local(exp: Experiment, timeout_s: float | None = None,
              on_tick: Callable[[procs.ProcessGroup], None] | None = None,
              tick_s: float = 5.0, printer: Callable[[str], None] = print) -> dict[str, int | None]:
  """Starts every job in order, waits for the primary jobs to exit, stops the rest.

  Raises procs.RoleError (with the log tail) when any job fails first or the timeout passes;
  every started process is stopped in all cases (also on Ctrl-C). Returns exit codes by job.
  """
  primary = [j.name for j in exp.jobs if j.primary]
  if not primary:
    raise ValueError(f"experiment {exp.name!r} has no primary job (the one whose exit ends it)")
  with procs.ProcessGroup(exp.log_dir) as group:
    for j in exp.jobs:
      group.start(procs.Role(j.name, j.executable.argv(exp.python), dict(j.executable.env),
                             ready_check(j.ready)))
      if j.ready:
        waited = group.wait_ready(j.name, j.ready_timeout_s)
        printer(f"  {j.name} ready after {waited:.1f}s (log {group.log_path(j.name)})")
      else:
        printer(f"  {j.name} started (log {group.log_path(j.name)})")
    t0 = time.monotonic()
    last_tick = t0
    while any(group.returncode(n) is None for n in primary):
      bad = group.failed()
      if bad:
        n = next(iter(bad))
        raise procs.RoleError(f"job {n!r} failed with code {bad[n]}; log {group.log_path(n)}:\n"
                              f"{procs.log_tail(group.log_path(n))}")
      if timeout_s is not None and time.monotonic() - t0 > timeout_s:
        raise procs.RoleError(f"experiment {exp.name!r} still running after {timeout_s:.0f}s; "
                              f"primary jobs {primary}")
      if on_tick is not None and time.monotonic() - last_tick >= tick_s:
        last_tick = time.monotonic()
        on_tick(group)
      time.sleep(0.5)
    codes = {n: group.returncode(n) for n in primary}
    bad = {n: c for n, c in codes.items() if c}
    if bad:
      n = next(iter(bad))
      raise procs.RoleError(f"primary job {n!r} exited with code {bad[n]}; log "
                            f"{group.log_path(n)}:\n{procs.log_tail(group.log_path(n))}")
    return group.stop_all()


def free_port() -> int:
  """A currently free loopback TCP port (for servers configured with port 0)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def link_tasks(root: str, split: str, out: str, limit: int = 0) -> str:
  """A dir of symlinks to `root`'s tasks of one split (workers roll out every task in a dir).

  Links left from an earlier call with another split or limit are removed (a re-run with a new
  `tasks.rl_split` must not roll out the old split too); other entries are left alone.
  """
  from klong_jax.tasks import list_tasks  # noqa: PLC0415
  dirs = list_tasks(root, split)
  if limit:
    dirs = dirs[:limit]
  if not dirs:
    raise ValueError(f"no {split!r} tasks under {root}; check the tasks root and split names")
  os.makedirs(out, exist_ok=True)
  keep = {os.path.basename(d) for d in dirs}
  for name in os.listdir(out):
    if name not in keep and os.path.islink(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  for d in dirs:
    link = os.path.join(out, os.path.basename(d))
    if os.path.islink(link) and os.readlink(link) == d:
      continue
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(d, link)
  return out


def rl_tasks_dir(workdir: str) -> str:
  """Where a run links its RL tasks (`link_rl_tasks`)."""
  return os.path.join(workdir, "tasks", "rl")


def link_rl_tasks(c: Any, root: str, workdir: str) -> str:
  """Links the RL tasks of a demo-shaped config (`tasks.rl_split`, at most `tasks.max_rl`)."""
  return link_tasks(root, c.tasks.rl_split, rl_tasks_dir(workdir), c.tasks.max_rl)


def config_overrides(overrides: Any) -> dict[str, Any]:
  """'a.b=1,c=x' (or a nested section {'a': {'b': 1}}) -> {'config.a.b': '1', 'config.c': 'x'}:
  absl config_flags override flags."""
  return {f"config.{k}": v if isinstance(v, str) else config_util.format_value(v)
          for k, v in config_util.overrides_dict(overrides).items()}


def config_flag(path: str, args: Any) -> str:
  """`--config=` of a config file and its arg section (or arg string): 'file.py:k=v,...'."""
  arg = config_util.format_arg(args)
  return f"{path}:{arg}" if arg else path


def context_flags(c: Any) -> dict[str, Any]:
  """The worker/distill flags of the run's one context policy (`c.context`, data/context.py)."""
  return {"context_tokens": c.context.max_len, "context_overlap": c.context.overlap,
          "max_completion_tokens": c.context.completion_tokens}


def context_overrides(c: Any) -> dict[str, Any]:
  """The same policy as trainer overrides: chunks = the contexts the rollouts were sampled in."""
  return {"config.data.max_len": c.context.max_len, "config.data.overlap": c.context.overlap,
          "config.data.completion_tokens": c.context.completion_tokens}


def server_job(c: Any, name: str, policy_dir: str, tokenizer: str, port: int) -> Job:
  """The inference server over a policy dir (hot-reloads the newest version)."""
  return Job(name, Executable("klong_jax.inference.server", {
      "config": config_flag(c.server.config, c.server.args), "policy_dir": policy_dir,
      "config.serve.port": port, "config.serve.tokenizer": tokenizer,
      "config.serve.model_name": c.server.model_name,
      **config_overrides(c.model_overrides)}),
      ready=f"http://127.0.0.1:{port}/health", ready_timeout_s=c.server.ready_timeout_s)


BUDGET_FLAGS = ("budget_clock", "prefill_s_per_token", "decode_s_per_token", "tool_cost",
                "tool_costs", "hang_factor")


def budget_flags(c: Any) -> dict[str, Any]:
  """The workers' budget clock flags (agent/budget.py) from `c.workers`, those it sets."""
  return {k: c.workers[k] for k in BUDGET_FLAGS if k in c.workers}


def worker_jobs(c: Any, prefix: str, server: str, tasks: str, stream: str, tokenizer: str,
                group_size: int, rounds: int, max_steps: int, time_limit_s: float,
                primary: bool = False, temperature: float = 1.0,
                routing_replay: bool = False, num: int = 0) -> list[Job]:
  """`num` (0: `c.workers.num`) rollout worker processes sharing one stream (distinct names)."""
  return [Job(f"{prefix}{i}", Executable("klong_jax.rollout.worker", {
      "server": server, "tasks": tasks, "stream": stream, "tokenizer": tokenizer,
      "model": c.server.model_name,
      "group_size": group_size, "rounds": rounds, "num_workers": 1, "worker": f"{prefix}{i}",
      "shuffle_seed": c.workers.shuffle_seed,
      "backend": c.backend, "max_steps": max_steps, "time_limit_s": time_limit_s,
      "reproduce_timeout_s": c.workers.reproduce_timeout_s,
      "ckpt_every_s": c.workers.get("ckpt_every_s", 600.0),
      **budget_flags(c),
      **context_flags(c),
      "temperature": temperature, "routing_replay": routing_replay,
      # Rubrics with LLM-graded leaves: the judge endpoint (key from $KLONG_JUDGE_API_KEY).
      **({"judge_url": c.workers.judge_url, "judge_model": c.workers.judge_model}
         if c.workers.judge_url else {})}), primary=primary)
      for i in range(num or c.workers.num)]


def rl_experiment(c: Any, workdir: str, *, init_checkpoint: str, tokenizer: str, tasks: str,
                  port: int | None = None) -> Experiment:
  """Progressive RL: trainer (publishes policy 0 first), server on its policy dir, N workers."""
  workdir = os.path.abspath(workdir)
  if c.rl.mode == "sync":  # A sync worker makes one group per policy version: a step needs
    # groups_per_step workers, else the trainer waits for groups no worker will make.
    rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
    if int(rl.rl.groups_per_step) > int(c.workers.num):
      raise ValueError(f"rl.mode=sync needs workers.num >= the RL config's groups per step "
                       f"({rl.rl.groups_per_step}), got {c.workers.num}: raise workers.num or "
                       "lower rl.args.groups")
  port = port or c.server.port or free_port()
  stream = os.path.join(workdir, "stream")
  policy = os.path.join(workdir, "policy")
  exp = Experiment(f"{c.name}-rl", workdir, python=c.python)
  temperature = c.workers.temperature
  exp.add(Job("trainer", Executable("klong_jax.rl.train", {
      "config": config_flag(c.rl.config, c.rl.args), "workdir": workdir, "stream": stream,
      "init_checkpoint": init_checkpoint, "mode": c.rl.mode, "config.seed": c.seed,
      # The trainer's logprobs must use the workers' sampling temperature (exact PPO ratios).
      "config.rl.temperature": temperature,
      # R3: the workers record routing exactly when the trainer replays it.
      "config.rl.routing_replay": c.rl.routing_replay,
      **config_overrides(c.model_overrides), **config_overrides(c.rl.overrides),
      **context_overrides(c)}),
      ready=f"file:{os.path.join(policy, '0')}", ready_timeout_s=c.server.ready_timeout_s,
      primary=True))
  exp.add(server_job(c, "server", policy, tokenizer, port))
  for j in worker_jobs(c, "worker", f"http://127.0.0.1:{port}/v1", tasks, stream, tokenizer,
                       c.workers.group_size, c.workers.rounds, c.workers.max_steps,
                       c.workers.time_limit_s, temperature=temperature,
                       routing_replay=c.rl.routing_replay):
    exp.add(j)
  return exp


def eval_experiment(c: Any, workdir: str, *, policy_dir: str, tokenizer: str, tasks: str,
                    port: int | None = None, episodes_per_task: int = 0) -> Experiment:
  """Evaluation: a server on `policy_dir` and `eval.workers` workers (0: `workers.num`),
  `episodes_per_task` (0: `eval.episodes_per_task`) rounds over `tasks` of one rollout each: a
  claim is one episode, so the workers stay busy to the end, and episode k of task t has the
  id `<t>-s0-r<k>-0` in every eval (arms pair on it)."""
  workdir = os.path.abspath(workdir)
  port = port or free_port()
  exp = Experiment(f"{c.name}-eval", workdir, python=c.python)
  exp.add(server_job(c, "server", policy_dir, tokenizer, port))
  for j in worker_jobs(c, "eval", f"http://127.0.0.1:{port}/v1", tasks,
                       os.path.join(workdir, "stream"), tokenizer, 1,
                       episodes_per_task or c.eval.episodes_per_task,
                       c.eval.max_steps, c.eval.time_limit_s, primary=True,
                       temperature=c.eval.temperature, num=int(c.eval.get("workers", 0))):
    exp.add(j)
  return exp

"""Rollout worker: tasks -> G agent rollouts per task -> graded Trajectories -> ArrayRecord shards.

  python -m klong_jax.rollout.worker --server=http://127.0.0.1:8000/v1 --tasks=DIR \\
      --stream=DIR --group_size=4 --num_workers=2 --tokenizer=PATH.model \\
      [--max_steps=50 --time_limit_s=600 --sandbox_limits=mem_bytes=2147483648,pids=512,cpus=2]

Episode flags (budgets, context policy, temperature, sandbox limits) are the one EpisodeConfig
(episode_config.py), shared with the eval and distill CLIs.

Each group (task x round) is claimed in the stream ledger, rolled out (its G members concurrently,
each model call seeded by (task, group, member, turn): agent/budget.request_seed), graded, rendered
and published as one shard (see stream.py for the exactly-once rules). Time limits are on the
clock `--budget_clock` names (wall | tokens); each trajectory records both (timings `agent_s`,
`budget_s`; metadata `budget`). Status rules: agent budget out
-> agent_timeout (graded); the outer wall guard -> wall_timeout (graded); sandbox or server
failures are retried with backoff, then the rollout is written as infra_error with reward None.
A submission the agent made uncollectable (too large, too many files, unreadable, missing) is its
own outcome: graded as an empty submission, never retried, with metadata `failure_reason` (kind)
and `failure_detail` (message).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import multiprocessing
import os
import re
import socket
import tempfile
import time
import uuid
from typing import Any

from absl import app, flags, logging

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold
from klong_jax.agent.tools import TOOLS
from klong_jax.data import shards as shards_lib
from klong_jax.data import storage
from klong_jax.data.schema import Trajectory
from klong_jax.data.shards import SUFFIX as SHARD_SUFFIX
from klong_jax.grading import reproduce as reproduce_lib
from klong_jax.rollout import episode, episode_ckpt, episode_config, task_sampling
from klong_jax.rollout.episode_config import ROLE_DEFAULTS, EpisodeConfig
from klong_jax.rollout.stream import open_stream, read_control
from klong_jax.rollout.task_sampling import round_order  # noqa: F401 (re-export)
from klong_jax.sandbox import base as sandbox_lib


@dataclasses.dataclass
class WorkerConfig:
  """Everything one worker process needs (picklable, for spawned workers)."""

  server: str
  tasks: str
  stream: str
  tokenizer: str
  group_size: int = 4
  rounds: int = 1
  # >= 0: each round visits the tasks in an order shuffled by (seed, round), the same on every
  # worker (verl/Tunix shuffle their prompt sets per epoch); -1: directory order. Matters when a
  # run's budget is shorter than a round: in order, it only ever sees the first families.
  shuffle_seed: int = -1
  # Deal the tasks round-robin over their families (task_sampling.py), so every window of F
  # groups covers the F families; False: the plain (shuffled or directory) order.
  interleave_families: bool = True
  worker: str = ""
  # Budgets, sampling, context policy and sandbox of each episode (the one episode config).
  episode: EpisodeConfig = dataclasses.field(default_factory=lambda: ROLE_DEFAULTS["rl"])
  # LLM judge for rubric leaves without a programmatic `check` (PaperBench SimpleJudge); the
  # API key is read from $KLONG_JUDGE_API_KEY (else $OPENAI_API_KEY, as klong_jax.eval does) so
  # it never appears on a command line.
  judge_url: str = ""
  judge_model: str = "judge"
  judge_concurrency: int = 4
  infra_retries: int = 2
  infra_backoff_s: float = 2.0
  pause_before_publish_s: float = 0.0  # Test hook (SIGKILL window).
  version_poll_s: float = 0.5          # Sync-mode gate: how often to ask the server its version.
  claim_lease_s: float = 300.0         # gs:// streams: a claim not renewed this long is stale.
  # Episode checkpoints (rollout/episode_ckpt.py): after an action, every this many actions
  # and/or seconds of agent time (0 = that trigger off; both 0 = no checkpoints). A crashed or
  # preempted rollout resumes from its last one, losing at most one interval of agent work.
  ckpt_every_steps: int = 0
  ckpt_every_s: float = 600.0

  @classmethod
  def from_fields(cls, **fields: Any) -> WorkerConfig:
    """From flat fields: the EpisodeConfig ones (max_steps, backend, limits, ...) go to
    `episode` (RL role defaults)."""
    rest, ep = episode_config.split_fields("rl", fields)
    return cls(**rest, episode=ep)


STALE_TMP_S = 3600.0  # Temp files untouched this long are from dead writers (any worker).


def clean_stale_temps(stream_dir: str, worker: str, older_than_s: float = STALE_TMP_S) -> int:
  """Removes temp files of interrupted writes under the stream dir: this worker's shard temps and
  anyone's temps untouched for `older_than_s` (a live writer's are newer); returns the count.
  A gs:// stream has no temps in the bucket (uploads are atomic): its local staging dir is cleaned.
  """
  if storage.is_gcs(stream_dir):
    stream_dir = shards_lib.staging_dir()
  own = re.compile(rf"\.{re.escape(worker)}-\d+{re.escape(SHARD_SUFFIX)}\.tmp-[0-9a-f]+")
  now, removed = time.time(), 0
  for dirpath, _, names in os.walk(stream_dir):
    for name in names:
      if not name.startswith(".") or (".tmp-" not in name and ".stale-" not in name):
        continue
      path = os.path.join(dirpath, name)
      try:
        if own.fullmatch(name) or now - os.lstat(path).st_mtime > older_than_s:
          os.unlink(path)
          removed += 1
      except FileNotFoundError:
        continue  # Renamed into place or removed by its writer meanwhile.
  return removed


def judge_leaves(task: Any) -> int:
  """Rubric leaves of `task` that need an LLM judge (no programmatic `check`)."""
  return sum(1 for leaf in task.rubric.leaves() if leaf.check is None)


def _grade(task: Any, sb: Any, host_sub: str, repro: sandbox_lib.ReproduceResult,
           commands: list[str], judge: Any = None) -> tuple[float | None, dict[str, Any]]:
  """Grades with klong_jax.grading when present; returns (reward, details)."""
  try:
    from klong_jax.grading.grade import grade_submission
  except ImportError:
    logging.warning("klong_jax.grading not available: reward None (grading hook missing)")
    return None, {"grading": "unavailable"}
  res = grade_submission(task, sb, sandbox_lib.SUBMISSION, repro, judge, commands=commands,
                         host_submission_dir=host_sub)
  return float(res.score), {"category_scores": res.category_scores,
                            "judge_failures": res.judge_failures,
                            "disqualified": res.disqualified, "reproduce": res.reproduce}


def _without_routing(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Messages minus the per-turn routing records (rendered into the trajectory's `routing`)."""
  out = []
  for m in messages:
    k = m.get("klong")
    if isinstance(k, dict) and "routed_experts" in k:
      m = dict(m, klong={key: v for key, v in k.items() if key != "routed_experts"})
    out.append(m)
  return out


class Worker:
  """One rollout process."""

  def __init__(self, cfg: WorkerConfig):
    from klong_jax.data import tool_parsers
    from klong_jax.data.chat import ChatFormat
    from klong_jax.data.tokenizer import load as load_tokenizer
    self.cfg = cfg
    self.name = cfg.worker or f"{socket.gethostname()}.{os.getpid()}"
    self.stream = open_stream(cfg.stream, self.name, cfg.claim_lease_s)
    self.fmt = ChatFormat(load_tokenizer(cfg.tokenizer))
    family = tool_parsers.family_for(self.fmt.tok.chat_dir or cfg.tokenizer)
    self.parser = tool_parsers.get_parser(family, chat_format=self.fmt)
    self.client = client_lib.make_client(cfg.server)
    self.judge = None
    if cfg.judge_url:
      from klong_jax.grading.judge import LLMJudge
      self.judge = LLMJudge(base_url=cfg.judge_url, model=cfg.judge_model,
                            api_key=os.environ.get("KLONG_JUDGE_API_KEY")
                            or os.environ.get("OPENAI_API_KEY", "EMPTY"),
                            max_concurrency=cfg.judge_concurrency)

  # -- one rollout ------------------------------------------------------------------------------

  def rollout(self, task: Any, stage: int, time_limit_s: float,
              ckpt: episode_ckpt.EpisodeCheckpointer | None = None,
              seed_key: tuple[str, str, int] | None = None,
              budget_clock: str = "") -> dict[str, Any]:
    """One episode + grading; returns fields for the Trajectory (raises on infra failure).
    With `ckpt` the episode resumes from its last checkpoint and checkpoints as it runs;
    `seed_key` (task, group, member) seeds the model calls (None: the server draws seeds);
    `budget_clock` (the trainer's control.json) overrides the clock of `--budget_clock`."""
    ep_cfg = self.cfg.episode
    if budget_clock and budget_clock != ep_cfg.budget_clock:
      ep_cfg = ep_cfg.replace(budget_clock=budget_clock)
    acfg = ep_cfg.agent_config(time_limit_s, seed_key=seed_key)
    prefix = scaffold.initial_messages(task.config.get("instructions", "Reproduce the paper."),
                                       task.paper_md, task.addendum_md)
    state: dict[str, Any] = {}
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="klong-sub-")
    with ep_cfg.sandbox() as sb:
      episode.prepare_sandbox(sb, task)
      resume, wall_s, on_step = None, ep_cfg.wall_s(time_limit_s), None
      if ckpt is not None:
        resume = ckpt.resume(sb, prefix)
        if resume is not None:  # The outer guard keeps bounding the whole episode's agent time.
          logging.info("%s: %s resumed after step %d", self.name, task.id, resume.steps)
          wall_s = max(ep_cfg.wall_slack_s, wall_s - scaffold.clock_elapsed(resume.clock))

        def on_step(st: scaffold.EpisodeState) -> None:
          ckpt.on_step(st, sb)
      ep = episode.run_guarded(self.client, sb, prefix, acfg, wall_s, state=state, fmt=self.fmt,
                               parser=self.parser, resume=resume, on_step=on_step)
      host_sub = tmp.name
      files, failure = sandbox_lib.collect_submission(sb, host_sub)
    agent_s = time.time() - t0  # (+ the agent time of the runs before a resume)
    if ckpt is not None and resume is not None:
      agent_s += scaffold.clock_elapsed(resume.clock)
    if failure:
      logging.warning("%s: %s: submission graded as empty: %s", self.name, task.id,
                      failure["failure_detail"])
    with ep_cfg.sandbox() as fresh:
      res, started = reproduce_lib.run_reproduce_in(fresh, files, ep_cfg.reproduce_timeout(task))
      if failure:
        res.output = f"[submission not collected: {failure['failure_detail']}]\n{res.output}"
      # output_dir is the agent's copy: checks read the reproduced files in `fresh` itself.
      repro = reproduce_lib.ReproduceResult(res, res.output, host_sub, started)
      commands = episode.agent_commands(ep.messages)
      reward, details = _grade(task, fresh, host_sub, repro, commands, self.judge)
    tmp.cleanup()
    status = ep.status
    if details.get("judge_failures"):
      # A leaf the judge could not grade would count 0 (PaperBench's rule): as an RL reward
      # that is noise, so the rollout is an infra error (masked, excluded from group means).
      logging.warning("%s: %s: %d judge failure(s); rollout marked infra_error", self.name,
                      task.id, details["judge_failures"])
      status, reward = "infra_error", None
    return {"messages": ep.messages, "prefix": ep.prefix_messages, "status": status,
            "reward": reward,
            "timings": {"agent_s": agent_s, "total_s": time.time() - t0, "retry_s": ep.retry_s,
                        "budget_s": ep.budget_s,
                        "token_clock_s": float(ep.clock.get("tokens", {}).get("elapsed_s", 0.0))},
            "metadata": {"end_reason": ep.end_reason, "steps": ep.steps, "trims": ep.trims,
                         "budget": dict(ep.clock, time_limit_s=time_limit_s),
                         "seed_key": list(seed_key) if seed_key else None,
                         "malformed_calls": ep.malformed_calls, "grade": details,
                         "reproduce_exit": res.exit_code, "temperature": ep_cfg.temperature,
                         **(ckpt.metadata() if ckpt is not None else {}), **failure},
            "sandbox": {"backend": ep_cfg.backend}}

  def rollout_with_retries(self, task: Any, stage: int, time_limit_s: float,
                           ckpt: episode_ckpt.EpisodeCheckpointer | None = None,
                           seed_key: tuple[str, str, int] | None = None,
                           budget_clock: str = "") -> dict[str, Any]:
    """Retries infra failures with backoff (from the last checkpoint, with `ckpt`); after the
    last one returns an infra_error record."""
    err: Exception | None = None
    for attempt in range(self.cfg.infra_retries + 1):
      try:
        return self.rollout(task, stage, time_limit_s, ckpt, seed_key, budget_clock)
      except (sandbox_lib.SandboxError, client_lib.InfraError, OSError) as e:
        err = e
        logging.warning("%s: infra failure on %s (attempt %d): %s", self.name, task.id,
                        attempt + 1, e)
        if isinstance(e, sandbox_lib.SandboxSetupError):
          break  # No retry fixes the host's setup.
        time.sleep(self.cfg.infra_backoff_s * (2 ** attempt))
    prefix = scaffold.initial_messages(task.config.get("instructions", "Reproduce the paper."),
                                       task.paper_md, task.addendum_md)
    return {"messages": prefix, "prefix": len(prefix), "status": "infra_error", "reward": None,
            "timings": {}, "metadata": {"error": str(err)[:2000]},
            "sandbox": {"backend": self.cfg.episode.backend}}

  def to_record(self, r: dict[str, Any], task_id: str, group_id: str, stage: int,
                index: int, min_version: int) -> bytes:
    from klong_jax.data.render import render_trajectory
    rendered = render_trajectory(r["messages"], self.fmt, tools=TOOLS,
                                 prefix_messages=r["prefix"])
    pv = rendered["policy_version"]
    sampled = pv[pv >= 0]
    meta = dict(r["metadata"])
    meta["stale"] = bool(sampled.size and int(sampled.min()) < min_version)
    traj = Trajectory(
        id=f"{group_id}-{index}", task_id=task_id, group_id=group_id, stage=stage,
        status=r["status"], reward=r["reward"], messages=_without_routing(r["messages"]),
        timings=r["timings"],
        sandbox=r["sandbox"], metadata=meta, **rendered)
    return traj.to_bytes()

  # -- sync-mode gate ---------------------------------------------------------------------------

  def served_version(self) -> int | None:
    """The policy version the server reports on GET /v1/models (None if it reports none)."""
    import httpx
    base = self.cfg.server.rstrip("/")
    url = (base if base.endswith("/v1") else base + "/v1") + "/models"
    try:
      data = httpx.get(url, timeout=10.0).json().get("data") or [{}]
    except (httpx.HTTPError, ValueError) as e:
      logging.warning("%s: cannot read the policy version from %s: %s", self.name, url, e)
      return -1
    v = data[0].get("policy_version")
    return None if v is None else int(v)

  def wait_for_policy(self) -> Any:
    """Blocks until the server serves >= control.policy_min_version; returns the fresh control.

    The synchronous RL baseline sets policy_min_version (>= 0) so no group starts on old
    weights; in that mode a worker also makes at most one group per served version (so the
    trainer's `rl.groups_per_step` must not exceed the number of workers). A server that reports
    no version (a teacher, vLLM) cannot be gated: warn once and go on.
    """
    ctl = read_control(self.cfg.stream)
    logged = 0.0
    while ctl.policy_min_version >= 0:
      v = self.served_version()
      if v is None:
        if not getattr(self, "_warned_version", False):
          logging.warning("%s: the server reports no policy_version; the sync gate is off",
                          self.name)
          self._warned_version = True
        break
      need = max(ctl.policy_min_version, getattr(self, "_sync_version", -1) + 1)
      if v >= need:
        self._sync_version = v
        break
      if time.monotonic() - logged > 30:
        logging.info("%s: waiting for policy version >= %d (server has %d)", self.name, need, v)
        logged = time.monotonic()
      time.sleep(self.cfg.version_poll_s)
      ctl = read_control(self.cfg.stream)
    return ctl

  # -- the loop ---------------------------------------------------------------------------------

  def run_group(self, task: Any, group_id: str, ctl: Any, limit: float) -> list[bytes]:
    """The group's G records, members concurrently (one thread each: they wait on the server
    and the sandbox), member i seeded by (task, group, i); each rollout resumes from its
    checkpoint, and one that already finished (a worker died later in the group) is taken as
    recorded, not rerun or regraded. Records in member order."""
    ck = episode_ckpt.CkptConfig(self.cfg.ckpt_every_steps, self.cfg.ckpt_every_s)

    def member(i: int) -> bytes:
      ckpt = (episode_ckpt.EpisodeCheckpointer(self.cfg.stream, group_id, i, self.name, ck)
              if ck.enabled else None)
      rec = ckpt.load_record() if ckpt is not None else None
      if rec is None:
        r = self.rollout_with_retries(task, ctl.stage, limit, ckpt=ckpt,
                                      seed_key=(task.id, group_id, i),
                                      budget_clock=ctl.budget_clock)
        r["metadata"].setdefault("family", task_sampling.task_family(task))
        rec = self.to_record(r, task.id, group_id, ctl.stage, i, ctl.policy_min_version)
        if ckpt is not None:
          ckpt.save_record(rec)
      return rec

    n = self.cfg.group_size
    with concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="member") as ex:
      return [f.result() for f in [ex.submit(member, i) for i in range(n)]]

  def run(self, task_dirs: list[str]) -> int:
    """Runs every unclaimed group; returns the number of groups this process published."""
    from klong_jax.tasks import load_task
    n = clean_stale_temps(self.cfg.stream, self.name)
    if n:
      logging.info("%s: removed %d temp files of interrupted writes", self.name, n)
    if self.cfg.episode.backend == "docker":
      from klong_jax.sandbox.docker_backend import gc_leaked
      n = gc_leaked()
      if n:
        logging.info("%s: removed %d leaked sandbox objects", self.name, n)
    tasks = [(d, load_task(d)) for d in task_dirs]  # read once, for the check and every round
    if self.judge is None:
      for d, task in tasks:
        n = judge_leaves(task)
        if n:
          raise ValueError(f"task {d} has {n} rubric leaves without a programmatic check; they "
                           "need an LLM judge: pass --judge_url (and --judge_model, "
                           "$KLONG_JUDGE_API_KEY)")
    published = 0
    # Each stage walks its own order from the start (task_sampling.StageCycle): its first F
    # groups cover the F task families, whatever the previous stage claimed.
    cycle = task_sampling.StageCycle([t for _, t in tasks], self.cfg.shuffle_seed,
                                     self.cfg.rounds, interleave=self.cfg.interleave_families)
    while True:
      ctl = self.wait_for_policy()
      item = cycle.next(ctl.stage)
      if item is None:
        return published
      rnd, task = item
      if ctl.tasks and not any(fnmatch.fnmatchcase(task.id, pat) for pat in ctl.tasks):
        continue  # Not in this stage's task mix.
      group_id = f"{task.id}-s{ctl.stage}-r{rnd}"
      shard = self.stream.claim(group_id, ctl.stage)
      if shard is None:
        continue
      if self.stream.published(shard):
        self.stream.mark_done(group_id, shard, -1)
        episode_ckpt.delete_group(self.cfg.stream, group_id)
        continue
      limit = ctl.time_limit_s or self.cfg.episode.time_limit_s
      logging.info("%s: group %s (G=%d, limit %.0fs on the %s clock)", self.name, group_id,
                   self.cfg.group_size, limit, ctl.budget_clock or self.cfg.episode.budget_clock)
      try:
        records = self.run_group(task, group_id, ctl, limit)
      except episode_ckpt.CheckpointFenced as e:
        logging.warning("%s: group %s abandoned: %s", self.name, group_id, e)
        continue
      self.stream.publish(group_id, shard, records, self.cfg.pause_before_publish_s)
      episode_ckpt.delete_group(self.cfg.stream, group_id)
      published += 1


def run_worker(cfg: WorkerConfig) -> int:
  """Entry for one (possibly spawned) worker process."""
  from klong_jax.tasks import list_tasks
  return Worker(cfg).run(list_tasks(cfg.tasks))


def run_fleet(cfg: WorkerConfig, num_workers: int) -> None:
  """Runs `num_workers` worker processes on this host (distinct names, shared stream)."""
  base = cfg.worker or f"{socket.gethostname()}"
  if num_workers == 1:
    run_worker(dataclasses.replace(cfg, worker=f"{base}.w0"))
    return
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=run_worker, args=(dataclasses.replace(cfg, worker=f"{base}.w{i}"),))
           for i in range(num_workers)]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  bad = [p.exitcode for p in procs if p.exitcode]
  if bad:
    raise SystemExit(f"{len(bad)} worker(s) failed with exit codes {bad}")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other entry points never clashes on flag names). The episode flags (budgets,
  sampling, context policy, `--sandbox_limits`) are the one set of episode_config.py."""
  flags.DEFINE_string("server", None, "OpenAI-compatible base URL (…/v1).")
  flags.DEFINE_string("tasks", None, "Directory of task dirs.")
  flags.DEFINE_string("stream", None, "Stream directory (shards + ledger + control).")
  flags.DEFINE_string("tokenizer", None, "SentencePiece .model or tokenizer.json.")
  flags.DEFINE_integer("group_size", 4, "Rollouts per task (the RL group).")
  flags.DEFINE_integer("num_workers", 1, "Worker processes on this host.")
  flags.DEFINE_integer("rounds", 1, "Passes over the task list.")
  flags.DEFINE_integer("shuffle_seed", -1, "Per-round task order seed (-1: in order).")
  flags.DEFINE_bool("interleave_families", True, "Visit tasks round-robin over their families "
                    "(config.yaml `family`); false: the plain order.")
  flags.DEFINE_string("worker", "", "Worker name prefix (default: hostname).")
  flags.DEFINE_float("pause_before_publish_s", 0.0, "Test hook: sleep before publishing.")
  flags.DEFINE_string("judge_url", "", "OpenAI-compatible judge endpoint for rubric leaves "
                      "without a programmatic check.")
  flags.DEFINE_string("judge_model", "judge", "Judge model name.")
  flags.DEFINE_integer("ckpt_every_steps", 0, "Episode checkpoint every this many actions "
                       "(0: off); a crashed rollout resumes from its last checkpoint.")
  flags.DEFINE_float("ckpt_every_s", 600.0, "Episode checkpoint every this many seconds of "
                     "agent time (0: off).")
  flags.DEFINE_float("claim_lease_s", 300.0, "gs:// streams: claims are renewed every third of "
                     "this; one not renewed this long is re-run elsewhere.")
  episode_config.define_flags("rl")


def main(argv: list[str]) -> None:
  del argv
  for name in ("server", "tasks", "stream", "tokenizer"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  try:
    ep_cfg = episode_config.from_flags("rl")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cfg = WorkerConfig(server=FLAGS.server, tasks=FLAGS.tasks, stream=FLAGS.stream,
                     tokenizer=FLAGS.tokenizer, group_size=FLAGS.group_size, rounds=FLAGS.rounds,
                     shuffle_seed=FLAGS.shuffle_seed,
                     interleave_families=FLAGS.interleave_families,
                     worker=FLAGS.worker or f"{socket.gethostname()}-{uuid.uuid4().hex[:4]}",
                     episode=ep_cfg, pause_before_publish_s=FLAGS.pause_before_publish_s,
                     judge_url=FLAGS.judge_url, judge_model=FLAGS.judge_model,
                     claim_lease_s=FLAGS.claim_lease_s, ckpt_every_steps=FLAGS.ckpt_every_steps,
                     ckpt_every_s=FLAGS.ckpt_every_s)
  run_fleet(cfg, FLAGS.num_workers)


def entry() -> None:
  """Console-script entry point (klong-worker)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

"""Episode checkpoints (rollout/episode_ckpt.py): an episode interrupted after a checkpoint and
resumed in a fresh sandbox ends exactly as the uninterrupted reference run (same actions, tool
results, token ids and logprobs, budget reminders), with downtime not charged to the agent."""

import json

import pytest

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold
from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.data import storage
from klong_jax.rollout import episode_ckpt
from klong_jax.sandbox.base import make_sandbox

WORK = 9      # Actions that append to the workspace before the submit.
STEP_S = 100  # Agent seconds each tool command takes on the fake clock.


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class Policy:
  """Action k (= assistant turns so far + 1) appends k to work.log and prints its line count,
  so a tool result shows whether the workspace matches the message log; then submits."""

  def __init__(self, clock):
    self.clock, self.version, self.calls = clock, 0, 0

  def __call__(self, messages, tools):
    self.calls += 1
    k = sum(m["role"] == "assistant" for m in messages) + 1
    klong = {"token_ids": [100 + k, 7, 8], "logprobs": [-0.01 * k, -0.5, -0.25],
             "policy_version": self.version}
    if k > WORK:
      call = {"name": "submit", "arguments": json.dumps({"end_message": "done"})}
    else:
      call = {"name": "bash", "arguments": json.dumps(
          {"cmd": f"echo {k} >> /workspace/submission/work.log && wc -l < "
                  "/workspace/submission/work.log"})}
    return {"role": "assistant", "content": f"step {k}", "klong": klong,
            "tool_calls": [{"id": f"c{k}", "type": "function", "function": call}]}


class Killed(Exception):
  pass


@pytest.fixture
def served():
  clock = Clock()
  policy = Policy(clock)
  url, stop = serve_in_thread(policy)
  yield clock, policy, client_lib.make_client(url)
  stop()


PREFIX = scaffold.initial_messages("Do the task.", "PAPER", "")
CFG = scaffold.AgentConfig(reminder_every=4, time_limit_s=1e5, retry_backoff_s=0.01)


class Ticking:
  """The agent's view of a sandbox: each command takes STEP_S on the fake clock (the
  checkpointer uses the sandbox itself, whose time the scaffold does not charge either)."""

  def __init__(self, sb, clock):
    self.sb, self.clock = sb, clock

  def exec(self, *a, **kw):
    self.clock.t += STEP_S
    return self.sb.exec(*a, **kw)

  def __getattr__(self, name):
    return getattr(self.sb, name)


def _run(client, clock, ckpt=None, sandbox=("local", {})):
  with make_sandbox(sandbox[0], **sandbox[1]) as sb:
    sb.exec("mkdir -p /workspace/submission", 10)
    resume = ckpt.resume(sb) if ckpt is not None else None
    hook = None
    if ckpt is not None:
      def hook(st):  # Checkpointing takes (fake) time: infra time, never the agent's budget.
        clock.t += STEP_S
        ckpt.on_step(st, sb)
    try:
      ep = scaffold.run_episode(client, Ticking(sb, clock), PREFIX, CFG, clock=clock,
                                resume=resume, on_step=hook)
    finally:
      log = sb.exec("cat /workspace/submission/work.log", 10).output
  return ep, log


def _strip(messages):
  """Messages without the run-specific bits (versions, the resume note, wall-clock meta)."""
  out = []
  for m in messages:
    if m.get("content", "").startswith("Note: this episode was interrupted"):
      continue
    m = {k: v for k, v in m.items() if k != "meta"}
    if "klong" in m:
      m["klong"] = {k: v for k, v in m["klong"].items() if k != "policy_version"}
    out.append(m)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", pytest.param("gcs", marks=pytest.mark.gcs),
                                   pytest.param("docker", marks=pytest.mark.docker)])
def test_resumed_episode_matches_uninterrupted(served, tmp_path, where, request):
  """Storage local or gs:// (local sandboxes), or local storage with docker sandboxes."""
  clock, policy, client = served
  sandbox = ("docker", {"image": request.getfixturevalue("image")}) if where == "docker" else \
      ("local", {})
  ref, ref_log = _run(client, clock, sandbox=sandbox)
  assert ref.steps == WORK + 1 and ref.status == "completed"
  assert ref_log.split() == [str(k) for k in range(1, WORK + 1)]

  root = request.getfixturevalue("gcs_root") if where == "gcs" else str(tmp_path)
  ck = episode_ckpt.CkptConfig(every_steps=3)
  clock.t, policy.calls = 0.0, 0
  first = episode_ckpt.EpisodeCheckpointer(root, "g", 0, "w-a", ck)

  def killed_after_5(st):
    first.on_step(st, sb_holder[0])
    if st.steps == 5:
      raise Killed  # The worker dies after action 5; its last checkpoint is after action 3.

  sb_holder = []
  with make_sandbox(sandbox[0], **sandbox[1]) as sb:
    sb_holder.append(sb)
    sb.exec("mkdir -p /workspace/submission", 10)
    assert first.resume(sb) is None
    with pytest.raises(Killed):
      scaffold.run_episode(client, Ticking(sb, clock), PREFIX, CFG, clock=clock,
                           on_step=killed_after_5)
  assert first.saves == 1
  clock.t += 1e4  # Downtime: not agent time.
  policy.version = 7  # The trainer published meanwhile: new actions use the current policy.
  second = episode_ckpt.EpisodeCheckpointer(root, "g", 0, "w-b", ck)
  ep, log = _run(client, clock, ckpt=second, sandbox=sandbox)

  assert log == ref_log  # The workspace went on from action 3: no action lost or doubled.
  assert _strip(ep.messages) == _strip(ref.messages)  # Same actions, ids, logprobs, reminders.
  versions = [m["klong"]["policy_version"] for m in ep.messages if "klong" in m]
  assert versions == [0] * 3 + [7] * (WORK + 1 - 3)  # Recorded tokens keep their versions.
  assert (ep.steps, ep.completion_tokens) == (ref.steps, ref.completion_tokens)
  # The budget clock skipped the downtime and the checkpointer's own time (after actions 4..9).
  assert ep.wall_s - ep.retry_s == pytest.approx(ref.wall_s - ref.retry_s)
  assert ep.retry_s == pytest.approx((WORK - 3) * STEP_S) and ref.retry_s == 0
  meta = second.metadata()
  assert meta["resumed"] and meta["resume_count"] == 1
  (r,) = meta["resumes"]
  assert (r["at_step"], r["not_repeated"], r["lost_steps"]) == (3, [1, 3], 2)
  assert r["lost_s"] == pytest.approx(2 * STEP_S) and r["from_worker"] == "w-a"
  assert second.saves == 2  # After actions 6 and 9.
  # The last checkpoint holds one workspace archive; the group's directory is removed at publish.
  d = episode_ckpt.episode_dir(root, "g", 0)
  names = ([o.path.rsplit("/", 1)[1] for o in storage.list_objects(d + "/")] if where == "gcs"
           else [p.name for p in tmp_path.joinpath("ledger/episodes/g/0").iterdir()])
  assert sorted(n.split("-")[0] for n in names) == [
      "messages"] * 3 + ["progress.json", "state.json", "workspace"]  # 1 archive, 3 log segments
  doc = json.loads(storage.read(f"{d}/state.json")[0] if where == "gcs"
                   else (tmp_path / "ledger/episodes/g/0/state.json").read_bytes())
  assert "messages" not in doc["episode"]  # the log lives in the segments
  assert doc["n_messages"] == len(ep.messages) - 2  # as of action 9
  episode_ckpt.delete_group(root, "g")
  assert (not storage.list_objects(d + "/")) if where == "gcs" else \
      not tmp_path.joinpath("ledger/episodes/g").exists()


def test_resume_rejects_another_tasks_checkpoint(served, tmp_path):
  _, _, client = served
  st = scaffold.EpisodeState(
      messages=scaffold.initial_messages("Other task.", "P", ""), prefix_messages=3, steps=1,
      completion_tokens=1, trims=0, malformed_calls=0, refusals=0, retry_s=0.0,
      context_start=3, window_first=0, clock=scaffold.clock_snapshot(5.0))
  with make_sandbox("local") as sb, pytest.raises(ValueError, match="another task"):
    scaffold.run_episode(client, sb, PREFIX, CFG, resume=st)
  with pytest.raises(ValueError, match="another klong-jax version"):
    scaffold.EpisodeState.from_json({"messages": []})
  # A worker finding such a checkpoint (or a torn/foreign one) starts afresh, never crash-loops.
  ck = episode_ckpt.EpisodeCheckpointer(str(tmp_path), "g", 0, "w", episode_ckpt.CkptConfig(1))
  ck._put_state(st.to_json(), None)
  with make_sandbox("local") as sb:
    assert ck.resume(sb, PREFIX) is None and not ck.resumes
    assert ck.resume(sb, st.messages[:3]).steps == 1  # its own task's prefix: resumed
    ck._put_state(st.to_json(), "workspace-gone.tar")  # its archive was removed
    assert ck.resume(sb, st.messages[:3]) is None
    no_log = {k: v for k, v in st.to_json().items() if k != "messages"}
    ck._put_state(no_log, None, ["messages-gone.json"], 3)  # a log segment was removed
    assert ck.resume(sb, st.messages[:3]) is None
    (tmp_path / "ledger/episodes/g/0/state.json").write_text("{not json")
    assert ck.resume(sb, PREFIX) is None
  with pytest.raises(ValueError, match="must be >= 0"):
    episode_ckpt.CkptConfig(every_steps=-1)


@pytest.mark.gcs
def test_gcs_takeover_fences_the_old_writer(served, gcs_root):
  """A worker that looked dead and lost its claim fails its next checkpoint write."""
  _, _, client = served
  ck = episode_ckpt.CkptConfig(every_steps=1)
  old = episode_ckpt.EpisodeCheckpointer(gcs_root, "g", 0, "old", ck)
  new = episode_ckpt.EpisodeCheckpointer(gcs_root, "g", 0, "new", ck)
  with make_sandbox("local") as sb:
    sb.exec("mkdir -p /workspace/submission", 10)
    hits = []

    def on_step(st):
      if st.steps == 2:
        assert new.resume(sb) is not None  # Took over after action 1.
      hits.append(st.steps)
      old.on_step(st, sb)
    with pytest.raises(episode_ckpt.CheckpointFenced, match="another worker"):
      scaffold.run_episode(client, sb, PREFIX, CFG, on_step=on_step)
  assert hits == [1, 2]
  doc = json.loads(storage.read(f"{gcs_root}/ledger/episodes/g/0/state.json")[0])
  assert doc["owner"] == "new" and doc["episode"]["steps"] == 1
  objs = [o.path for o in storage.list_objects(gcs_root + "/")]
  assert [sum(k in o for o in objs) for k in ("workspace-", "messages-")] == [1, 1]


@pytest.mark.parametrize("backend", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_workspace_archive_restores_into_a_fresh_sandbox(backend, tmp_path, request):
  """The checkpoint's workspace archive keeps what a file copy would lose: modes, symlinks, a
  git history (docker: streamed out by the engine, nothing staged in the workspace)."""
  limits = {"image": request.getfixturevalue("image")} if backend == "docker" else {}
  setup = ("cd /workspace/submission && printf '#!/bin/sh\\necho ran\\n' > run && chmod 755 run "
           "&& ln -s run link && mkdir -p d/e && echo deep > d/e/f && git init -q . && "
           "git -c user.email=a@b -c user.name=a add -A && "
           "git -c user.email=a@b -c user.name=a commit -qm first")
  check = ("cd /workspace/submission && ./link && test -x run && test -L link && cat d/e/f && "
           "git log --format=%s && ls -a /workspace")
  tar = str(tmp_path / "ws.tar")
  with make_sandbox(backend, **limits) as sb:
    assert sb.exec(f"mkdir -p /workspace/submission && {setup}", 60).ok
    want = sb.exec(check, 60)
    episode_ckpt.archive_workspace(sb, tar)
    assert sb.exec("ls -a /workspace", 30).output == want.output.split("first\n", 1)[1]
  with make_sandbox(backend, **limits) as fresh:
    episode_ckpt.restore_workspace(fresh, open(tar, "rb").read())
    got = fresh.exec(check, 60)
  assert want.ok and got.ok, (want.output, got.output)
  assert got.output == want.output and "ran\ndeep\nfirst" in got.output


class FailsOnce:
  """LongPolicy whose server fails every request for action 5 until the episode was resumed:
  an infrastructure failure the worker retries (from the last checkpoint)."""

  def __init__(self, gradelog):
    from tests.rollout.test_episode_faults import LongPolicy
    self.inner = LongPolicy(gradelog)

  def __call__(self, messages, tools):
    k = sum(m.get("role") == "assistant" for m in messages) + 1
    if k == 5 and not any("was interrupted" in str(m.get("content")) for m in messages):
      raise RuntimeError("server down")
    return self.inner(messages, tools)


@pytest.mark.slow
def test_worker_infra_retry_resumes_from_the_checkpoint(tmp_path):
  """A rollout whose model server fails mid-episode is retried from its last checkpoint (not
  from the prompt), graded once, and its checkpoints are gone after the publish."""
  import shutil

  from klong_jax.data.schema import from_bytes
  from klong_jax.data.shards import list_shards, read_shard
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.rollout.worker import Worker, WorkerConfig
  from klong_jax.tasks import bundled_tasks_dir
  from tests.rollout.test_episode_faults import WORK

  tasks = tmp_path / "tasks"
  shutil.copytree(f"{bundled_tasks_dir()}/arith-1", tasks / "arith-1")
  policy = FailsOnce(tmp_path / "grades.log")
  url, stop = serve_in_thread(policy)
  try:
    w = Worker(WorkerConfig.from_fields(
        server=url, tasks=str(tasks), stream=str(tmp_path / "s"),
        tokenizer=default_tokenizer(tmp_path / "tok").path, group_size=1, backend="local",
        max_steps=WORK + 4, time_limit_s=600.0, reproduce_timeout_s=60.0, worker="w",
        request_retries=0, infra_backoff_s=0.0, ckpt_every_steps=3, ckpt_every_s=0.0,
        routing_replay=False))
    assert w.run([str(tasks / "arith-1")]) == 1
  finally:
    stop()
  (t,) = [from_bytes(r) for s in list_shards(str(tmp_path / "s")) for r in read_shard(s)]
  assert t.status == "completed" and t.reward == 1.0, t.metadata
  assert t.metadata["resume_count"] == 1 and t.metadata["resumes"][0]["at_step"] == 3
  reqs = [policy.inner.requests[k] for k in sorted(policy.inner.requests)]
  assert reqs == [1, 1, 1, 2] + [1] * (len(reqs) - 4)  # action 4 was lost (after the ckpt)
  assert (tmp_path / "grades.log").read_text().count("\n") == 1
  assert not (tmp_path / "s" / "ledger" / "episodes" / "arith-1-s0-r0").exists()


class Kill(BaseException):
  """A stand-in for SIGKILL inside the process: nothing catches it."""


@pytest.mark.slow
def test_group_killed_in_its_second_rollout_keeps_the_first_as_graded(tmp_path, monkeypatch):
  """G=2: the worker dies during rollout 1; the worker taking the claim over publishes rollout
  0's recorded trajectory (not rerun, not regraded) and resumes rollout 1 from its checkpoint."""
  import shutil

  from klong_jax.data.schema import from_bytes
  from klong_jax.data.shards import list_shards, read_shard
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.rollout.worker import Worker, WorkerConfig
  from klong_jax.tasks import bundled_tasks_dir
  from tests.rollout.test_episode_faults import WORK, LongPolicy

  tasks = tmp_path / "tasks"
  shutil.copytree(f"{bundled_tasks_dir()}/arith-1", tasks / "arith-1")
  policy = LongPolicy(tmp_path / "grades.log")
  url, stop = serve_in_thread(policy)
  real = episode_ckpt.EpisodeCheckpointer.on_step
  killed = []

  def on_step(self, st, sb):
    real(self, st, sb)
    if self.dir.endswith("/1") and st.steps == 4 and not killed:
      killed.append(st.steps)
      raise Kill

  monkeypatch.setattr(episode_ckpt.EpisodeCheckpointer, "on_step", on_step)
  tok = default_tokenizer(tmp_path / "tok").path

  def worker(name):
    return Worker(WorkerConfig.from_fields(
        server=url, tasks=str(tasks), stream=str(tmp_path / "s"), tokenizer=tok, group_size=2,
        backend="local", max_steps=WORK + 4, time_limit_s=600.0, reproduce_timeout_s=60.0,
        worker=name, ckpt_every_steps=3, ckpt_every_s=0.0, routing_replay=False))
  try:
    with pytest.raises(Kill):
      worker("a").run([str(tasks / "arith-1")])
    claim = tmp_path / "s" / "ledger" / "claims" / "arith-1-s0-r0.json"
    doc = json.loads(claim.read_text())
    claim.write_text(json.dumps(dict(doc, pid=doc["pid"] + 10_000_000)))  # "a" is dead
    assert worker("b").run([str(tasks / "arith-1")]) == 1
  finally:
    stop()
  recs = [from_bytes(r) for s in list_shards(str(tmp_path / "s")) for r in read_shard(s)]
  assert sorted(t.id for t in recs) == ["arith-1-s0-r0-0", "arith-1-s0-r0-1"]
  assert all(t.status == "completed" and t.reward == 1.0 for t in recs)
  first, second = sorted(recs, key=lambda t: t.id)
  assert first.metadata["resumed"] is False  # recorded by "a", published by "b" as it was
  assert second.metadata["resume_count"] == 1
  (ev,) = second.metadata["resumes"]
  assert (ev["worker"], ev["from_worker"], ev["at_step"], ev["lost_steps"]) == ("b", "a", 3, 1)
  # Requests per action over both rollouts: each action twice, action 4 of rollout 1 (lost
  # after the checkpoint) three times; rollout 0 was not rerun (that would make them all 3).
  reqs = [policy.requests[k] for k in sorted(policy.requests, key=lambda pk: pk[1])]
  assert reqs == [2, 2, 2, 3] + [2] * (len(reqs) - 4)
  assert (tmp_path / "grades.log").read_text().count("\n") == 2  # each rollout graded once
  assert not any((tmp_path / "s" / "ledger" / "episodes").iterdir())


def test_interval_in_actions_and_or_agent_seconds(tmp_path):
  """Due after `every_steps` actions or `every_s` agent seconds since the last checkpoint,
  whichever comes first; both 0 = never."""
  def st(steps, elapsed):
    return scaffold.EpisodeState(
        messages=[], prefix_messages=0, steps=steps, completion_tokens=0, trims=0,
        malformed_calls=0, refusals=0, retry_s=0.0, context_start=0, window_first=0,
        clock=scaffold.clock_snapshot(elapsed))

  def due(every_steps, every_s, points):
    ck = episode_ckpt.EpisodeCheckpointer(str(tmp_path), "g", 0, "w",
                                          episode_ckpt.CkptConfig(every_steps, every_s))
    out = []
    for steps, elapsed in points:
      if ck.cfg.enabled and ck.due(st(steps, elapsed)):
        out.append(steps)
        ck._last_step, ck._last_s = steps, elapsed  # what save() records
    return out

  points = [(k, 100.0 * k if k < 5 else 400 + 10.0 * (k - 4)) for k in range(1, 13)]
  assert due(0, 250.0, points) == [3]  # 300 s; then 10 s actions never reach 250 s more
  assert due(4, 0.0, points) == [4, 8, 12]
  assert due(4, 250.0, points) == [3, 7, 11]
  assert due(0, 0.0, points) == []

"""Fault test of episode checkpoints: real rollout workers (subprocesses) run N long scripted
episodes and are SIGKILLed K times at random points; each kill is followed by a restart under the
same name or by a new worker taking the stale claim over. On local and GCS-emulator storage:
every episode is published, graded and trained exactly once, resumed ones record the actions they
did not repeat, the work lost per kill is at most one checkpoint interval, nothing is duplicated
or lost, and the trajectory keeps each token's recorded policy version across the kill."""

import collections
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.data import storage
from klong_jax.data.schema import from_bytes
from klong_jax.data.shards import list_shards, read_shard
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.rollout.stream import write_json_atomic
from klong_jax.tasks import bundled_tasks_dir

pytestmark = pytest.mark.subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ("arith-1", "collatz-1", "arith-2")  # N = 3 episodes (group size 1).
WORK = 7      # Work actions per episode before the scripted teacher solves and submits.
EVERY = 3     # ckpt_every_steps.
KILLS = 3     # K.


class LongPolicy:
  """Action k <= WORK appends k to work.log and prints its line count (a tool result shows
  whether the restored workspace matches the message log); action 1 also writes a random tag
  that the graded reproduce.sh appends to GRADELOG, so each grading of an episode leaves one line.
  Then the perfect teacher solves and submits. Counts requests per (episode, action)."""

  def __init__(self, gradelog):
    self.teacher, self.gradelog = ScriptedTeacher(skill=1.0, seed=0), gradelog
    self.version, self.requests = 0, collections.Counter()

  def __call__(self, messages, tools):
    k = sum(m.get("role") == "assistant" for m in messages) + 1
    paper = next(m["content"] for m in messages if "<paper>" in str(m.get("content")))
    self.requests[(paper, k)] += 1
    klong = {"token_ids": [10 + k % 50, 11, 12], "logprobs": [-0.5, -0.25, -0.125],
             "policy_version": self.version}
    if k <= WORK:
      cmd = (f"cd /workspace/submission && echo {k} >> work.log && wc -l < work.log"
             + (f" && echo {uuid.uuid4().hex} > tag.txt" if k == 1 else "") + " && sleep 0.05")
      return {"role": "assistant", "content": f"Work step {k}.", "klong": klong,
              "tool_calls": [{"id": f"w{k}", "type": "function", "function": {
                  "name": "bash", "arguments": json.dumps({"cmd": cmd})}}]}
    msg = self.teacher(messages, tools)
    for call in msg.get("tool_calls") or []:
      args = json.loads(call["function"]["arguments"])
      if call["function"]["name"] == "bash" and "reproduce.sh" in args["cmd"]:
        line = f'[ -n "$AGENT_RUN" ] || cat tag.txt >> {self.gradelog}'
        args["cmd"] += f"\ncd /workspace/submission && printf '%s\\n' '{line}' >> reproduce.sh"
        args["cmd"] = args["cmd"].replace("bash reproduce.sh", "AGENT_RUN=1 bash reproduce.sh")
        call["function"]["arguments"] = json.dumps(args)
    return dict(msg, klong=klong)


def _progress(stream):
  """{episode dir: (owner, step)} from the live checkpoints' progress.json."""
  out = {}
  if storage.is_gcs(stream):
    paths = [o.path for o in storage.list_objects(f"{stream}/ledger/episodes/")
             if o.path.endswith("/progress.json")]
  else:
    paths = glob.glob(os.path.join(stream, "ledger", "episodes", "*", "*", "progress.json"))
  for p in paths:
    try:
      got = storage.read(p) if storage.is_gcs(p) else (open(p, "rb").read(), 0)
    except FileNotFoundError:
      continue
    if got is not None:
      d = json.loads(got[0])
      out[p.rsplit("/", 1)[0]] = (d["owner"].removesuffix(".w0"), int(d["step"]))  # run_fleet
  return out


@pytest.mark.parametrize("where", ["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def test_sigkilled_workers_resume_episodes_exactly_once(tmp_path, where, request):
  from klong_jax.data.tokenizer import default_tokenizer
  tok = default_tokenizer(tmp_path / "tok").path
  tasks = tmp_path / "tasks"
  for t in TASKS:
    shutil.copytree(os.path.join(bundled_tasks_dir(), t), tasks / t)
  stream = (request.getfixturevalue("gcs_root") + "/stream" if where == "gcs"
            else str(tmp_path / "stream"))
  env = {**os.environ, "PYTHONPATH": REPO, "KLONG_SHARD_STAGING": str(tmp_path / "staging")}
  write_json_atomic(storage.join(stream, "control.json"), {"stage": 0, "time_limit_s": 600})
  gradelog = tmp_path / "grades.log"
  policy = LongPolicy(gradelog)
  url, stop_server = serve_in_thread(policy)
  rng = random.Random(f"faults-{where}")

  def start(name):
    argv = [sys.executable, "-m", "klong_jax.rollout.worker", f"--server={url}",
            f"--tasks={tasks}", f"--stream={stream}", f"--tokenizer={tok}", "--group_size=1",
            "--backend=local", f"--worker={name}", f"--max_steps={WORK + 4}",
            "--reproduce_timeout_s=60", f"--ckpt_every_steps={EVERY}", "--ckpt_every_s=0",
            "--routing_replay=false", "--shuffle_seed=1"]
    log = open(tmp_path / f"{name}.log", "a")
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=log)

  t0 = time.monotonic()
  procs = {"w0": start("w0"), "w1": start("w1")}
  dead: set[str] = set()
  killed_at: dict[str, int] = {}  # episode dir -> progress step when we killed its worker
  kills = []
  try:
    for j in range(KILLS):
      # After its first checkpoint is complete (saved at step EVERY), before it submits.
      target = rng.randint(EVERY + 1, WORK - 1)
      deadline = time.monotonic() + 120
      while True:
        hit = [(d, o) for d, (o, s) in _progress(stream).items()
               if s >= target and s > killed_at.get(d, -1) and o in procs
               and procs[o].poll() is None]
        if hit:
          break
        assert time.monotonic() < deadline, f"no episode reached step {target}: " + "".join(
            (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs)
        time.sleep(0.03)
      d, owner = rng.choice(hit)
      procs[owner].send_signal(signal.SIGKILL)
      procs[owner].wait()
      killed_at[d] = _progress(stream)[d][1]
      policy.version += 1  # The trainer publishes while the episode is down.
      # Restart under the same name (a restarted pod), or a new worker takes the claim over.
      name = owner if j % 2 == 0 else f"w{len(procs) + len(dead)}"
      if name != owner:
        dead.add(owner)
        del procs[owner]
      procs[name] = start(name)
      kills.append((j, owner, name, target, killed_at[d]))
    for name, p in procs.items():
      assert p.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
    stop_server()
  wall = time.monotonic() - t0

  shards = list_shards(stream)
  recs = [from_bytes(r) for s in shards for r in read_shard(s)]
  assert len(recs) == len(TASKS) and len({r.id for r in recs}) == len(TASKS)  # none lost/doubled
  assert sorted(r.task_id for r in recs) == sorted(TASKS)
  done = (storage.list_objects(f"{stream}/ledger/done/") if where == "gcs"
          else os.listdir(os.path.join(stream, "ledger", "done")))
  assert len(done) == len(TASKS)
  grades = gradelog.read_text().split()
  resumed, lost, repeated = 0, [], 0
  for r in recs:
    assert r.status == "completed" and r.reward == 1.0, (r.task_id, r.status, r.metadata)
    tool = [m["content"] for m in r.messages if m["role"] == "tool"]
    assert [t.strip() for t in tool[:WORK]] == [str(k) for k in range(1, WORK + 1)], tool
    tag = next(a for m in r.messages for c in m.get("tool_calls") or ()
               for a in [json.loads(c["function"]["arguments"])["cmd"]] if "tag.txt" in a)
    assert grades.count(tag.split("echo ")[-1].split(" >")[0]) == 1  # graded exactly once
    steps = [m for m in r.messages if m["role"] == "assistant"]
    paper = next(m["content"] for m in r.messages if "<paper>" in str(m.get("content")))
    reqs = {k: policy.requests[(paper, k)] for k in range(1, len(steps) + 1)}
    versions = [m["klong"]["policy_version"] for m in steps]
    assert versions == sorted(versions)  # kept from before the kill, current after it
    if not r.metadata.get("resumed"):
      assert set(reqs.values()) == {1}, (r.task_id, reqs, kills, r.metadata)
      continue
    resumed += r.metadata["resume_count"]
    first = r.metadata["resumes"][0]
    assert all(reqs[k] == 1 for k in range(1, first["at_step"] + 1))  # really not repeated
    for ev in r.metadata["resumes"]:
      assert ev["not_repeated"] == [1, ev["at_step"]] and ev["at_step"] >= EVERY
      assert ev["lost_steps"] <= EVERY  # work lost per kill: at most one interval
      lost.append(ev["lost_s"])
    # Repeated actions: the lost ones plus the one in flight at the kill, per resume.
    repeated += sum(reqs.values()) - len(steps)
    assert sum(reqs.values()) - len(steps) <= sum(ev["lost_steps"] + 1
                                                  for ev in r.metadata["resumes"])
    assert len(set(versions)) > 1  # it spans policy versions from before and after a kill
  assert len(grades) == len(TASKS)
  assert resumed == KILLS  # every kill hit a running episode, which was resumed
  assert not _progress(stream)  # checkpoints deleted after publish
  print(f"\n{where}: {len(TASKS)} episodes x {WORK + 2} actions, {KILLS} SIGKILLs {kills}: "
        f"{len(recs)} published once, {len(grades)} gradings, resumes {resumed}, lost agent s "
        f"per kill {[round(x, 2) for x in lost]} (interval {EVERY} actions), repeated actions "
        f"{repeated}, {wall:.1f}s")

"""Sandbox and fleet throughput: container start -> first exec, exec round trip, episodes/minute.

  python -m benchmarks.sandbox [--starts=10] [--execs=30] [--bench_workers=1,2,4] [--bench_tasks=4]
Writes benchmarks/results/sandbox.json. Episodes run the real worker (docker backend, grading,
shards) against the scripted teacher served by klong_jax.agent.policy_server.
"""

import glob
import json
import os
import shutil
import socket
import statistics
import tempfile
import time

from absl import app, flags

_STARTS = flags.DEFINE_integer("starts", 10, "Containers to start for the latency numbers.")
_EXECS = flags.DEFINE_integer("execs", 30, "Exec round trips to time.")
_WORKERS = flags.DEFINE_list("bench_workers", ["1", "2", "4"], "Worker counts for episodes/minute.")
_TASKS = flags.DEFINE_integer("bench_tasks", 4, "Tasks per fleet run (group size 1 each).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/sandbox.json", "Result file.")


def _pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv):
  del argv
  from klong_jax.agent.policy_server import serve_in_thread
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.factory.teacher import ScriptedTeacher
  from klong_jax.rollout.worker import WorkerConfig, run_fleet
  from klong_jax.sandbox import image as image_lib
  from klong_jax.sandbox.base import make_sandbox
  from klong_jax.tasks import bundled_tasks_dir

  t0 = time.time()
  tag = image_lib.ensure_image()
  ensure_s = time.time() - t0
  starts, firsts = [], []
  for _ in range(_STARTS.value):
    t = time.time()
    with make_sandbox("docker") as sb:
      t1 = time.time()
      sb.exec("true", 10)
      firsts.append(time.time() - t)
      starts.append(t1 - t)
  rts = []
  with make_sandbox("docker") as sb:
    for _ in range(_EXECS.value):
      t = time.time()
      sb.exec("echo hi", 10)
      rts.append(time.time() - t)
  work = tempfile.mkdtemp(prefix="klong-bench-")
  default_tokenizer(os.path.join(work, "tok"))
  tok = glob.glob(os.path.join(work, "tok", "*.model"))[0]
  tasks = os.path.join(work, "tasks")
  for t in sorted(os.listdir(bundled_tasks_dir()))[:_TASKS.value]:
    shutil.copytree(os.path.join(bundled_tasks_dir(), t), os.path.join(tasks, t))
  url, stop = serve_in_thread(ScriptedTeacher(skill=1.0, seed=0))
  fleet = {}
  for n in map(int, _WORKERS.value):
    stream = os.path.join(work, f"stream{n}")
    t = time.time()
    run_fleet(WorkerConfig.from_fields(server=url, tasks=tasks, stream=stream, tokenizer=tok,
                                       group_size=1, rounds=n, max_steps=6,
                                       worker=f"bench{n}"), n)
    dt = time.time() - t
    episodes = len(glob.glob(os.path.join(stream, "ledger", "done", "*.json")))
    fleet[str(n)] = {"episodes": episodes, "seconds": round(dt, 2),
                     "episodes_per_min": round(60 * episodes / dt, 2)}
    print(f"workers={n}: {episodes} episodes in {dt:.1f}s")
  stop()
  shutil.rmtree(work, ignore_errors=True)
  res = {"host": socket.gethostname(), "cpus": os.cpu_count(), "image": tag,
         "ensure_image_s": round(ensure_s, 2),
         "container_start_s": {"p50": round(statistics.median(starts), 3),
                               "p95": round(_pct(starts, 0.95), 3)},
         "start_to_first_exec_s": {"p50": round(statistics.median(firsts), 3),
                                   "p95": round(_pct(firsts, 0.95), 3)},
         "exec_round_trip_s": {"p50": round(statistics.median(rts), 4),
                               "p95": round(_pct(rts, 0.95), 4)},
         "fleet": fleet,
         "note": "each episode = agent sandbox + fresh reproduce sandbox + grading + shard write"}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  tmp = _OUT.value + ".tmp"
  with open(tmp, "w") as f:
    json.dump(res, f, indent=2)
  os.replace(tmp, _OUT.value)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  app.run(main)

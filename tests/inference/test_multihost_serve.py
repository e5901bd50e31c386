"""Multi-host serving (inference/multihost.py): two JAX processes x 4 CPU devices == one x 8.

The link's own behaviour runs in one process over an in-memory store: messages round-trip, and a
follower with another config, one that falls silent and a call for other weights each end in a
LinkError naming the process and the cause. The proof runs two processes on loopback
(jax.distributed through the launcher's KLONG_* env): process 0 schedules the paged engine on a
data 2 x expert 2 x tensor 2 serving mesh and process 1 follows; the tokens (logprobs within
1e-5), versions and engine counters equal the same engine in this one 8-device process through
greedy and seeded sampling, chunked prefill, a prefix-cache hit and a weight swap in the middle of
generation. The HTTP test starts the server CLI itself on two processes and asks process 0 for a
completion. A process that dies between calls ends the other with an error, not a hang. Run as a
script (`--worker OUT POLICY` / `--link-worker MODE`) this file is one of those processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request

import numpy as np
import pytest

from klong_jax.inference import multihost
from klong_jax.inference.engine import Completion
from klong_jax.launch.experiment import free_port
from tests import multiproc
from tests.inference.test_paged_engine import assert_same
from tests.inference.test_paged_mesh import PAGED

MESH = dict(data=2, fsdp=1, expert=2, tensor=2)


# ---- the link in one process ---------------------------------------------------------------


class MemoryStore:
  """The coordination service's key-value store, in memory (blocking get with a timeout)."""

  def __init__(self):
    self.data: dict[str, bytes] = {}
    self.cond = threading.Condition()

  def set(self, key, value):
    with self.cond:
      self.data[key] = value
      self.cond.notify_all()

  def get(self, key, timeout_s):
    with self.cond:
      self.cond.wait_for(lambda: key in self.data, timeout_s)
      return self.data.get(key)

  def delete(self, key):
    with self.cond:
      self.data.pop(key, None)


def test_message_round_trip_sends_page_tables_up_to_their_last_page():
  pages = np.zeros((16, 2048), np.int32)  # A decode call's table at 32K context, 16 rows.
  pages[3, :5] = [7, 8, 9, 10, 11]
  arrays = {"page_indices": pages, "temp": np.array([0.0, 0.7], np.float32),
            "seeds": np.array([2**32 - 1, 3, 0], np.uint32), "num_seqs": np.array([0], np.int32),
            "stop": np.array([[-1, 2, -1], [0, 0, 0]], np.int32),
            "valid": np.array([True, False, True, False]), "scalar": np.array(5, np.int64)}
  data = multihost.encode("decode", 7, {"version": 3}, arrays)
  assert len(data) < 1000 < pages.nbytes  # 5 columns of 16 rows, not 2048.
  full = pages.copy()
  full[:] = np.arange(1, 16 * 2048 + 1).reshape(16, 2048)  # Every row at 32K: runs of pages.
  full[5, 100:200] = np.arange(9000, 9100)[::-1]
  big = multihost.encode("decode", 8, {}, {"page_indices": full})
  assert len(big) < 4000 < full.nbytes
  np.testing.assert_array_equal(multihost.decode(big).arrays["page_indices"], full)
  msg = multihost.decode(data)
  assert (msg.op, msg.seq, msg.meta) == ("decode", 7, {"version": 3})
  assert msg.arrays.keys() == arrays.keys()
  for k, v in arrays.items():
    assert msg.arrays[k].dtype == v.dtype and msg.arrays[k].shape == v.shape, k
    np.testing.assert_array_equal(msg.arrays[k], v, err_msg=k)
  with pytest.raises(ValueError, match="unknown call"):
    multihost.encode("reboot", 0)


def _leader_in_thread(store, fingerprint, timeout_s=10.0, processes=2):
  """Starts a Leader (its hello blocks on acks) in a thread -> (thread, box with leader/error)."""
  box = {}

  def run():
    try:
      box["leader"] = multihost.Leader(store, processes, fingerprint, timeout_s)
    except multihost.LinkError as e:
      box["error"] = e

  t = threading.Thread(target=run)
  t.start()
  return t, box


def test_follower_with_another_config_is_refused_on_both_sides():
  store = MemoryStore()
  t, box = _leader_in_thread(store, {"decode_steps": 4, "num_pages": 33})
  with pytest.raises(multihost.LinkError, match="decode_steps: process 0 4 vs here 2"):
    multihost.Follower(store, 1, {"decode_steps": 2, "num_pages": 33}, timeout_s=10)
  t.join()
  assert "follower process 1 refused call 0 (hello)" in str(box["error"])
  assert "same config" in str(box["error"])


def test_silent_follower_is_a_timeout_error_naming_it():
  store = MemoryStore()
  fp = {"x": 1}
  t, box = _leader_in_thread(store, fp, processes=3, timeout_s=0.3)
  follower = multihost.Follower(store, 1, fp, timeout_s=10)  # Process 2 never comes.
  t.join()
  err = box["error"]
  assert "follower process 2 did not take call 0 (hello) within 0.3s" in str(err)
  assert follower.seq == 1
  with pytest.raises(multihost.LinkError, match="no hello from process 0"):
    multihost.Follower(MemoryStore(), 1, fp, timeout_s=0.2, poll_s=0.05)


def test_call_for_other_weights_is_refused_and_every_later_call_fails_fast():
  store = MemoryStore()
  fp = {"x": 1}
  t, box = _leader_in_thread(store, fp)
  follower = multihost.Follower(store, 1, fp, timeout_s=10)
  t.join()
  leader = box["leader"]
  ran = []
  engine = types.SimpleNamespace(sampler=types.SimpleNamespace(policy_version=2),
                                 pages_per_seq=8, precompile=lambda: ran.append("precompile"))
  result = {}

  def follow():
    try:
      multihost.follow(engine, follower)
    except multihost.LinkError as e:
      result["error"] = e

  t = threading.Thread(target=follow)
  t.start()
  leader.send("precompile", version=2)  # Runs (engine.precompile).
  with pytest.raises(multihost.LinkError, match="version 3 but this process serves version 2"):
    leader.send("precompile", version=3)
  t.join()
  assert "call 2 (precompile) is for weights version 3" in str(result["error"])
  with pytest.raises(multihost.LinkError, match="refused call 2"):  # Dead: no new wait.
    leader.send("stop")
  assert leader.stats["calls"] == 2 and ran == ["precompile"]  # hello + the first precompile.


def test_health_is_503_once_the_link_failed(tok, chat_format):
  from klong_jax.inference import server as server_lib  # noqa: PLC0415

  link = types.SimpleNamespace(error=None)
  engine = types.SimpleNamespace(link=link, policy_version=0, num_running=lambda: 0,
                                 num_waiting=lambda: 0)
  server = server_lib.Server(engine, tok, chat_format, model_name="m")
  assert server.health()["status"] == "ok"
  link.error = multihost.LinkError("follower process 1 did not take call 9 (decode)")
  with pytest.raises(server_lib.ApiError, match="follower process 1") as e:
    server.health()
  assert e.value.status == 503 and e.value.code == "multihost_link_failed"


# ---- two processes -------------------------------------------------------------------------


def _engine():
  """The paged engine on the 8-device serving mesh (one process or two)."""
  from klong_jax.inference.paged.engine import PagedEngine  # noqa: PLC0415
  from klong_jax.inference.sampler import Sampler  # noqa: PLC0415
  from klong_jax.model.config import get_preset  # noqa: PLC0415
  from klong_jax.model.sharded import create_sharded_model  # noqa: PLC0415
  from klong_jax.parallel import rules as rules_lib  # noqa: PLC0415
  from klong_jax.parallel.mesh import make_mesh  # noqa: PLC0415

  mesh, rules = make_mesh(MESH), rules_lib.SERVING_RULES
  model = create_sharded_model(get_preset("tiny"), mesh, seed=0, rules=rules)
  sampler = Sampler(model, max_batch=4, max_len=64, mesh=mesh, rules=rules, dense_cache=False)
  return PagedEngine(sampler, **PAGED)


def _scenario(engine, policy: str) -> list[Completion]:
  """Greedy + seeded sampling, a 25-token prompt in two chunks (budget 16), a 24-token prefix
  hit, then a swap to policy version 1 two steps into a third wave."""
  from klong_jax.inference import reload  # noqa: PLC0415
  from klong_jax.inference.sampler import SamplingParams  # noqa: PLC0415

  engine.precompile()
  prefix = list(range(40, 64))
  first = [list(range(20, 45)), prefix + [1, 2], [5, 6, 7]]
  second = [prefix + [3, 4, 5], [8, 9, 10, 11]]
  sps = [SamplingParams(temperature=0.0, max_tokens=10, top_logprobs=2),
         SamplingParams(temperature=0.8, top_p=0.9, max_tokens=9, seed=4),
         SamplingParams(temperature=1.0, max_tokens=7)]  # Seed drawn by the engine.
  out = engine.generate(first, sps) + engine.generate(second, sps[:2])
  reqs = [engine.submit(p, sp) for p, sp in zip([[9, 8, 7, 6], prefix + [7]], sps[:2],
                                                strict=True)]
  for _ in range(2):
    engine.step()
  engine.set_params(reload.PolicySwap(engine.sampler, f"{policy}/1", 1, policy), 1)
  while not all(r.done for r in reqs):
    engine.step()
  return out + [r.wait() for r in reqs]


def _dump(comps: list[Completion]) -> list[dict]:
  return [dict(prompt_ids=c.prompt_ids, token_ids=c.token_ids, logprobs=c.logprobs,
               policy_versions=c.policy_versions, text=c.text, finish_reason=c.finish_reason,
               top_logprobs=c.top_logprobs) for c in comps]


def _worker(out: str, policy: str) -> None:
  import jax  # noqa: PLC0415

  jax.config.update("jax_num_cpu_devices", 4)
  from klong_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415

  assert maybe_initialize_distributed(), "KLONG_COORDINATOR must be set for a worker"
  assert jax.process_count() == 2 and jax.device_count() == 8
  engine = _engine()
  follower = multihost.connect(engine, timeout_s=120)
  if follower is not None:
    result = {"calls": multihost.follow(engine, follower)}
  else:
    comps = _scenario(engine, policy)
    engine.stop()  # Stops process 1 too.
    result = {"completions": _dump(comps), "stats": dict(engine.stats),
              "link": engine.link.stats}
  with open(f"{out}.{jax.process_index()}.json", "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


def _link_worker(mode: str) -> None:
  """One end of a bare link (1 CPU device, no model); `mode` says which end dies after hello."""
  import jax  # noqa: PLC0415

  jax.config.update("jax_num_cpu_devices", 1)
  from klong_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415

  maybe_initialize_distributed()
  store, fp = multihost.CoordinatorStore(), {"x": 1}
  start = time.monotonic()
  try:
    if jax.process_index() == 0:
      leader = multihost.Leader(store, 2, fp, timeout_s=3)
      if mode == "leader-dies":
        os._exit(0)
      leader.send("precompile", version=0)
      print("RESULT sent", flush=True)
    else:
      follower = multihost.Follower(store, 1, fp, timeout_s=60, poll_s=1)
      if mode == "follower-dies":
        os._exit(3)
      follower.recv()
      print("RESULT received", flush=True)
  except multihost.LinkError as e:
    print(f"RESULT LinkError after {time.monotonic() - start:.0f}s: {e}", flush=True)
  os._exit(0)  # No jax.distributed.shutdown: its barrier would wait for the dead process.


def _start(argv: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Two processes (4 CPU devices each) joined over a loopback coordinator."""
  return multiproc.start_two(argv, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                             **(extra_env or {}))


def _completion(d: dict) -> Completion:
  top = [[tuple(a) for a in t] for t in d.pop("top_logprobs")]
  return Completion(**d, top_logprobs=top)


@pytest.mark.subprocess
def test_a_dead_process_ends_the_other_with_an_error_not_a_hang():
  """Follower dies between calls: process 0's next call is a LinkError after the ack timeout.
  Process 0 dies: JAX's coordination client aborts the follower, or its next read of the store
  is a LinkError, whichever comes first."""
  for mode in ("follower-dies", "leader-dies"):
    procs = _start([os.path.abspath(__file__), "--link-worker", mode])
    logs = [p.communicate(timeout=120)[0] for p in procs]
    codes = [p.returncode for p in procs]
    if mode == "follower-dies":
      assert codes == [0, 3], logs
      assert "RESULT LinkError" in logs[0] and "follower process 1 did not take call 1 " \
          "(precompile) within 3s: it died" in logs[0], logs[0][-3000:]
    else:  # Whichever sees it first: JAX's error poller aborts, or our read of the store fails.
      aborted = codes[1] != 0 and "JAX distributed service detected fatal errors" in logs[1]
      raised = codes[1] == 0 and "RESULT LinkError" in logs[1] and \
          "the coordination service (process 0) is unreachable" in logs[1]
      assert codes[0] == 0 and (aborted or raised), logs[1][-3000:]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_paged_engine_matches_one_process(tmp_path):
  import jax  # noqa: PLC0415

  from klong_jax.inference import reload  # noqa: PLC0415
  from klong_jax.model.config import get_preset  # noqa: PLC0415
  from klong_jax.model.sharded import create_sharded_model  # noqa: PLC0415
  from klong_jax.parallel import rules as rules_lib  # noqa: PLC0415
  from klong_jax.parallel.mesh import make_mesh  # noqa: PLC0415

  assert jax.device_count() == 8, "tests/conftest.py should give this process 8 CPU devices"
  policy = str(tmp_path / "policy")
  reload.save_policy(policy, 1, create_sharded_model(
      get_preset("tiny"), make_mesh(MESH), seed=1, rules=rules_lib.SERVING_RULES))
  out = str(tmp_path / "run")
  procs = _start([os.path.abspath(__file__), "--worker", out, policy])
  try:
    ref = _engine()
    want = _scenario(ref, policy)  # The one-process reference, while the pair runs.
  finally:
    multiproc.wait_all(procs)
  lead, follow = (json.load(open(f"{out}.{i}.json")) for i in range(2))
  got = [_completion(d) for d in lead["completions"]]
  assert_same(got, want)
  assert [c.policy_versions[0] for c in got[-2:]] == [0, 0]
  assert all(c.policy_versions[-1] == 1 for c in got[-2:])  # Swapped mid-generation.
  assert lead["stats"] == dict(ref.stats)
  assert ref.stats["prefix_cache_hit_tokens_total"] == 48 and ref.stats["reloads_total"] == 1
  # Every device call was announced once: hello + precompile + each call + swap + stop.
  calls = ref.stats["device_calls_total"]
  assert lead["link"]["calls"] == calls + 4 and follow["calls"] == calls + 2
  print(f"link: {lead['link']['calls']} messages, {lead['link']['bytes']} bytes, "
        f"{1e3 * lead['link']['seconds'] / lead['link']['calls']:.2f} ms each (send + acks, "
        "incl. waiting while process 1 compiles or restores)")


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_server_answers_a_completion_on_process_0(tmp_path, tok, chat_format):
  from klong_jax.inference.paged.engine import PagedEngine  # noqa: PLC0415
  from klong_jax.inference.sampler import Sampler, SamplingParams  # noqa: PLC0415
  from klong_jax.model.config import get_preset  # noqa: PLC0415
  from klong_jax.model.sharded import create_sharded_model  # noqa: PLC0415
  from klong_jax.parallel.mesh import make_mesh  # noqa: PLC0415

  port = free_port()
  sets = dict(**{f"mesh.{k}": v for k, v in MESH.items()}, **{
      "serve.precompile": False, "serve.token_budget": 16, "serve.prefix_block": 8,
      "serve.tokenizer": str(tok.path), "serve.reload_interval_s": 0, "serve.kv_pages": 64})
  argv = ["-m", "klong_jax.inference.server", "--config=configs/serve_tiny.py:max_batch=4,"
          "max_len=64", f"--port={port}", *(f"--config.{k}={v}" for k, v in sets.items())]
  prompt = [5, 6, 7, 8, 9]
  procs = _start(argv)
  try:
    # The same engine in this one 8-device process (the server's init: seed 0, default rules),
    # while the two start.
    model = create_sharded_model(get_preset("tiny"), make_mesh(MESH), seed=0)
    engine = PagedEngine(Sampler(model, max_batch=4, max_len=64, mesh=make_mesh(MESH),
                                 dense_cache=False), stop_token_ids=chat_format.stop_token_ids,
                         page_size=8, token_budget=16, num_pages=64)
    want = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    deadline = time.monotonic() + 180
    while True:
      assert all(p.poll() is None for p in procs), "a server process exited at start-up"
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
      except OSError:
        assert time.monotonic() < deadline, "process 0 did not serve /health within 180 s"
        time.sleep(0.5)
    body = json.dumps({"model": "klong-tiny", "prompt": prompt, "max_tokens": 8,
                       "temperature": 0, "logprobs": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    answer = json.load(urllib.request.urlopen(req, timeout=120))
    procs[0].send_signal(signal.SIGTERM)  # Process 0 stops; it tells process 1 to stop.
  finally:
    logs = multiproc.wait_all(procs, timeout=120)
  assert "following process 0" in logs[1] and "Uvicorn running" not in logs[1]
  assert "process 1: stop after" in logs[1]  # Told to stop by process 0, exited 0.
  choice = answer["choices"][0]
  assert choice["token_ids"] == want.token_ids and choice["finish_reason"] == want.finish_reason
  np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], want.logprobs, atol=1e-5)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
  elif len(sys.argv) == 3 and sys.argv[1] == "--link-worker":
    _link_worker(sys.argv[2])
  else:
    sys.exit("usage: test_multihost_serve.py --worker OUT POLICY | --link-worker MODE "
             "(pytest runs the tests)")

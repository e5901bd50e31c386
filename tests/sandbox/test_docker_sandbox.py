"""Adversarial docker sandbox tests: each attack is contained and the exec ends with a status."""

import os
import time

import pytest

pytestmark = pytest.mark.docker

SMALL = dict(mem_bytes=256 << 20, pids=64, workspace_bytes=32 << 20, tmp_bytes=16 << 20,
             max_output=8192, kill_grace_s=0.5)


@pytest.fixture(scope="module")
def sb(image):
  from klong_jax.sandbox.base import make_sandbox
  with make_sandbox("docker", image=image, **SMALL) as s:
    yield s


def _still_works(sb):
  r = sb.exec("echo alive", timeout_s=10)
  assert r.ok and r.output.strip() == "alive", r


def test_basics_non_root_readonly_files(sb, tmp_path):
  r = sb.exec("id -u; python3 -c 'import numpy; print(numpy.ones(3).sum())'", timeout_s=20)
  assert r.ok and r.output.split() == ["1000", "3.0"], r
  sb.put_files({"d/a.txt": b"hi", "run.sh": b"echo ran"}, dest="/workspace/sub")
  assert sb.exec("cat d/a.txt && bash run.sh", 10, workdir="/workspace/sub").output == "hiran\n"
  sb.get_dir("/workspace/sub", str(tmp_path / "out"))
  assert (tmp_path / "out" / "d" / "a.txt").read_bytes() == b"hi"


def test_write_outside_workspace_fails(sb):
  r = sb.exec("touch /etc/pwned || touch /usr/pwned || echo blocked; ls /etc/pwned", 10)
  assert "blocked" in r.output and r.exit_code != 0, r
  with pytest.raises(ValueError, match="must be under /workspace"):
    sb.put_files({"x": b"1"}, dest="/etc")


def test_network_unreachable(sb):
  code = ("import socket\ntry:\n  socket.create_connection(('1.1.1.1', 80), timeout=3)\n"
          "  print('CONNECTED')\nexcept OSError as e:\n  print('BLOCKED', e)")
  r = sb.exec(f"python3 -c \"{code}\"", 15)
  assert "BLOCKED" in r.output and "CONNECTED" not in r.output, r


def test_fork_bomb_contained(sb):
  t0 = time.time()
  r = sb.exec("bomb() { bomb | bomb & }; bomb; sleep 3", timeout_s=4)
  assert time.time() - t0 < 20, "fork bomb exec did not end in time"
  assert r.exit_code == 0 and not r.timed_out  # Looks fine by its status alone...
  assert r.pids_limited and r.pids_max == SMALL["pids"], r  # ...but the limit was hit.
  from klong_jax.agent.tools import execute_tool
  out = execute_tool(sb, "bash", {"cmd": "bomb() { bomb | bomb & }; bomb; sleep 2"}, 3).content
  assert f"[process limit reached: {SMALL['pids']} pids" in out, out
  assert not sb.exec("true", 10).pids_limited
  _still_works(sb)
  left = sb.exec("ps -e --no-headers | wc -l", 10)
  assert int(left.output.split()[0]) < 10, left.output  # The bomb's group was killed.


def test_agent_cannot_stop_its_container(sb):
  r = sb.exec("kill -TERM 1; pkill -KILL sleep; kill -KILL -1; echo survived", timeout_s=10)
  assert sb.alive()
  _still_works(sb)
  assert "nobody" in sb.exec("ps -o user= -p 1", 10).output, r


def test_oversized_sparse_submission_is_the_agents_fault(sb, tmp_path):
  from klong_jax.sandbox.base import SandboxError, SubmissionError
  sb.exec("mkdir -p /workspace/s1 && echo ok > /workspace/s1/a.txt && "
          "truncate -s 300M /workspace/s1/big.bin", 10)
  t0 = time.time()
  with pytest.raises(SubmissionError, match=r"big.bin \(300.0 MiB\)") as e:
    sb.get_dir("/workspace/s1", str(tmp_path / "o"))
  assert e.value.kind == "too_large" and isinstance(e.value, SandboxError)
  assert time.time() - t0 < 15  # Measured in the sandbox, not streamed out first.
  sb.exec("rm -rf /workspace/s1", 10)


def test_too_many_files_and_links_out(image, tmp_path):
  from klong_jax.sandbox.base import SubmissionError, make_sandbox
  with make_sandbox("docker", image=image, **{**SMALL, "max_get_files": 50}) as s:
    s.exec("mkdir -p /workspace/s/d && cd /workspace/s && echo hi > a.txt && "
           "ln -s /etc/passwd out && mkfifo pipe && "
           "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\"", 10)
    s.get_dir("/workspace/s", str(tmp_path / "ok"))
    assert sorted(os.listdir(tmp_path / "ok")) == ["a.txt", "d"]  # Links, fifos, sockets out.
    s.exec("touch /workspace/s/d/f{1..60}", 10)
    with pytest.raises(SubmissionError, match="more than 50 files") as e:
      s.get_dir("/workspace/s", str(tmp_path / "many"))
    assert e.value.kind == "too_many_files"
    with pytest.raises(FileNotFoundError):
      s.get_dir("/workspace/nope", str(tmp_path / "none"))


def test_read_file_chunk_reads_only_the_chunk(sb):
  """A 300 MB sparse file under a 256 MB memory limit (read whole, it was OOM-killed: 137)."""
  from klong_jax.agent.tools import execute_tool
  sb.exec("truncate -s 300M /workspace/sparse && printf 'a\\nb\\n' >> /workspace/sparse", 10)
  out = execute_tool(sb, "read_file_chunk", {"file": "/workspace/sparse"}, 60)
  assert not out.error and out.content.startswith("File has 2 total lines"), out.content[-300:]
  assert out.content.endswith("[... line cut: 314572801 bytes]\n2: b"), out.content[-300:]
  assert len(out.content) < 3000
  out = execute_tool(sb, "read_file_chunk", {"file": "/workspace/sparse", "start_line": 2}, 60)
  assert out.content.endswith("Showing lines 2 to 2.\n\n2: b"), out.content[-300:]
  out = execute_tool(sb, "read_file_chunk", {"file": "/dev/zero"}, 60)
  assert out.error and "/dev/zero is not a regular file" in out.content, out.content
  out = execute_tool(sb, "search_file", {"file": "/workspace/sparse", "query": "B"}, 60)
  assert "[Match 1 of 1]" in out.content and ">>> 2: b" in out.content, out.content[-300:]
  sb.exec("rm -f /workspace/sparse", 10)


def test_memory_hog_killed(sb):
  r = sb.exec("python3 -c 'x = bytearray(1 << 30); print(len(x))'", timeout_s=30)
  assert not r.ok and str(1 << 30) not in r.output, r
  _still_works(sb)


def test_disk_fill_bounded(sb):
  r = sb.exec("head -c 100M /dev/zero > /workspace/big; echo rc=$?; df -k /workspace", 30)
  assert "No space left" in r.output, r
  sb.exec("rm -f /workspace/big", 10)
  _still_works(sb)


def test_sigterm_ignored_is_killed(sb):
  t0 = time.time()
  r = sb.exec("trap '' TERM; echo started; sleep 60", timeout_s=1.0)
  took = time.time() - t0
  assert r.timed_out and "started" in r.output, r
  assert took < 8, took
  assert "sleep 60" not in sb.exec("ps -eo args", 10).output


def test_50mb_output_truncated(sb):
  t0 = time.time()
  r = sb.exec("head -c 50000000 /dev/zero | tr '\\0' x; echo END", timeout_s=60)
  assert r.ok and r.truncated, r.exit_code
  assert len(r.output) < 3 * SMALL["max_output"], len(r.output)
  assert "output truncated" in r.output and r.output.rstrip().endswith("END")
  assert time.time() - t0 < 30


def test_reproduce_in_fresh_container(image, tmp_path):
  from klong_jax.grading.reproduce import reproduce
  sub = tmp_path / "sub"
  sub.mkdir()
  (sub / "reproduce.sh").write_text("mkdir -p results && echo 42 > results/x.txt && echo done\n")
  out = tmp_path / "out"
  res = reproduce(str(sub), 60, str(out), backend="docker", image=image, **SMALL)
  assert res.result.ok and "done" in res.log
  assert (out / "results" / "x.txt").read_text() == "42\n"
  assert "done" in (out / "reproduce.log").read_text()


def test_fresh_checks_tell_reproduced_files_from_stale_ones(image):
  """Files put in before reproduce.sh are dated before its start (in the container's clock),
  what reproduce.sh writes is fresh: the PaperBench Result Analysis rule on docker."""
  from klong_jax.grading.checks import run_check
  from klong_jax.grading.reproduce import run_reproduce_in
  from klong_jax.sandbox.base import SUBMISSION, make_sandbox
  files = {"reproduce.sh": b"mkdir -p results && echo 1 > results/new.txt\n",
           "results/old.txt": b"1\n"}
  with make_sandbox("docker", image=image, **SMALL) as fresh:
    res, started = run_reproduce_in(fresh, files, 60)
    assert res.ok, res

    def check(path):
      return run_check({"type": "regex", "file": path, "pattern": "1"}, fresh, SUBMISSION, res,
                       fresh=True, reproduce_started_at=started)
    assert check("results/new.txt")[0] == 1.0
    score, why = check("results/old.txt")
    assert score == 0.0 and "not written by the reproduce run" in why
    assert run_check({"type": "regex", "file": "results/old.txt", "pattern": "1"}, fresh,
                     SUBMISSION, res)[0] == 1.0  # Not fresh-only: any file counts.


def test_leaked_containers_collected(image):
  import docker

  from klong_jax.sandbox import docker_backend
  client = docker.from_env()
  c = client.containers.run(image, ["sleep", "60"], detach=True, labels={
      docker_backend.LABEL: "1", docker_backend.OWNER_LABEL: f"{os.uname().nodename}:999999"})
  try:
    assert docker_backend.gc_leaked() >= 1
    with pytest.raises(docker.errors.NotFound):
      client.containers.get(c.id)
  finally:
    try:
      c.remove(force=True)
    except docker.errors.NotFound:
      pass


def test_cpu_time_from_the_container_cgroup(sb):
  """The budget clock's tool charge: cgroup cpu.stat usage over the exec, not wall time."""
  busy = sb.exec("python3 -c 'import time\nt = time.process_time()\n"
                 "while time.process_time() - t < 0.3: pass'", 60)
  idle = sb.exec("sleep 0.5", 60)
  assert busy.ok and busy.cpu_s is not None and busy.cpu_s >= 0.28, busy
  assert idle.ok and idle.cpu_s is not None and idle.cpu_s < 0.2, idle

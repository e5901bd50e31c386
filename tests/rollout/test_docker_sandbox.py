"""Adversarial docker sandbox tests: each attack is contained and the exec ends with a status."""

import os
import time

import pytest

pytestmark = pytest.mark.docker

SMALL = dict(mem_bytes=256 << 20, pids=64, workspace_bytes=32 << 20, tmp_bytes=16 << 20,
             max_output=8192, kill_grace_s=0.5)


@pytest.fixture(scope="module")
def sb(image):
  from klong_jax.rollout.sandbox import make_sandbox
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
  assert r.exit_code is not None
  _still_works(sb)
  left = sb.exec("ps -e --no-headers | wc -l", 10)
  assert int(left.output.split()[0]) < 10, left.output  # The bomb's group was killed.


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
  from klong_jax.rollout.sandbox import reproduce
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
  from klong_jax.rollout.sandbox import SUBMISSION, make_sandbox, run_reproduce_in
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

  from klong_jax.rollout import docker_backend
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

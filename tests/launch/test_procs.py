"""Role processes: logs, readiness (ok / died first / timeout), SIGTERM then SIGKILL, groups."""

import os
import sys
import time

import pytest

from klong_jax.launch import procs


def _py(code: str) -> list[str]:
  return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.mark.subprocess
def test_ready_log_and_clean_stop(tmp_path):
  flag = tmp_path / "ready"
  code = f"import time; print('hello from role', flush=True); open({str(flag)!r}, 'w'); " \
         "time.sleep(60)"
  with procs.ProcessGroup(str(tmp_path / "logs"), grace_s=5) as g:
    p = g.start(procs.Role("a", _py(code), ready=procs.file_ready(str(flag))))
    assert g.wait_ready("a", timeout_s=30) >= 0
    assert g.returncode("a") is None
  assert p.poll() is not None  # Stopped on exit of the context.
  log = (tmp_path / "logs" / "a.log").read_text()
  assert "hello from role" in log and "stopped" in log


@pytest.mark.subprocess
def test_died_before_ready_names_role_and_log(tmp_path):
  with procs.ProcessGroup(str(tmp_path)) as g:
    g.start(procs.Role("bad", _py("import sys; print('boom detail'); sys.exit(3)"),
                       ready=lambda: False))
    with pytest.raises(procs.RoleError, match=r"(?s)'bad' exited with code 3.*boom detail"):
      g.wait_ready("bad", timeout_s=30, interval_s=0.05)


@pytest.mark.subprocess
def test_not_ready_timeout(tmp_path):
  with procs.ProcessGroup(str(tmp_path), grace_s=2) as g:
    g.start(procs.Role("slow", _py("import time; time.sleep(60)"), ready=lambda: False))
    with pytest.raises(procs.RoleError, match="not ready after"):
      g.wait_ready("slow", timeout_s=0.5, interval_s=0.05)


@pytest.mark.subprocess
def test_sigterm_ignored_gets_sigkill_and_children_die(tmp_path):
  pidfile = tmp_path / "child.pid"
  ready = tmp_path / "ready"
  code = ("import signal, subprocess, sys, time\n"
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
          f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
          f"open({str(ready)!r}, 'w')\n"
          "time.sleep(120)\n")
  with procs.ProcessGroup(str(tmp_path), grace_s=0.5) as g:
    g.start(procs.Role("stubborn", _py(code), ready=procs.file_ready(str(ready))))
    g.wait_ready("stubborn", timeout_s=30, interval_s=0.05)
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    rc = g.stop("stubborn")
  assert rc == -9 and time.monotonic() - t0 < 10
  for _ in range(50):
    if not _alive(child):
      break
    time.sleep(0.1)
  assert not _alive(child), "the role's child process outlived the role"


def test_http_ready_false_on_closed_port():
  assert procs.http_ready("http://127.0.0.1:9/health", timeout_s=0.2)() is False


def test_log_tail(tmp_path):
  p = tmp_path / "x.log"
  p.write_text("\n".join(f"line {i}" for i in range(100)))
  assert procs.log_tail(str(p), 3).splitlines() == ["line 97", "line 98", "line 99"]
  assert procs.log_tail(str(tmp_path / "missing.log")) == ""

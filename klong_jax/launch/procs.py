"""Start and stop the role processes of one experiment on this machine (trainer, servers, workers).

Each role runs in its own session (process group) with stdout+stderr in `<logs>/<role>.log`;
readiness is a polled check (HTTP 200 or a file appearing) that fails fast, with the log tail,
when the process dies first; shutdown sends SIGTERM to each group, then SIGKILL after a grace
period, and runs on Ctrl-C/SIGTERM of the launcher too. JAX-free (used by launchers and the demo).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO

ReadyCheck = Callable[[], bool]


class RoleError(RuntimeError):
  """A role failed to start, died, or never became ready; the message holds its log tail."""


@dataclasses.dataclass
class Role:
  """One process to run: a name (also its log file stem), argv, extra env, readiness check."""

  name: str
  argv: list[str]
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  ready: ReadyCheck | None = None
  cwd: str | None = None


def http_ready(url: str, timeout_s: float = 2.0) -> ReadyCheck:
  """A check that passes once GET `url` answers 200 (e.g. a server's /health)."""

  def check() -> bool:
    try:
      with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback URL
        return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
      return False

  return check


def file_ready(path: str) -> ReadyCheck:
  """A check that passes once `path` exists (e.g. a first policy version or a state file)."""
  return lambda: os.path.exists(path)


def log_tail(path: str, lines: int = 30) -> str:
  """The last `lines` lines of a log file ('' when it does not exist)."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 64 * 1024))
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return ""
  return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
  """The running roles of one experiment; a context manager that always stops what it started."""

  def __init__(self, log_dir: str, grace_s: float = 10.0, handle_signals: bool = True):
    self.log_dir = os.path.abspath(log_dir)
    self.grace_s = grace_s
    self.handle_signals = handle_signals
    self.procs: dict[str, subprocess.Popen] = {}
    self.roles: dict[str, Role] = {}
    self._logs: dict[str, IO[bytes]] = {}
    self._stopped: set[str] = set()
    self._old_handlers: dict[int, object] = {}
    os.makedirs(self.log_dir, exist_ok=True)

  # -- lifecycle --------------------------------------------------------------------------------

  def __enter__(self) -> ProcessGroup:
    if self.handle_signals:
      for sig in (signal.SIGINT, signal.SIGTERM):
        try:
          self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # Not the main thread: the caller handles signals.
          break
    return self

  def __exit__(self, *exc) -> None:
    self.stop_all()
    for sig, old in self._old_handlers.items():
      signal.signal(sig, old)
    self._old_handlers.clear()

  def _on_signal(self, signum: int, frame) -> None:
    del frame
    print(f"[procs] signal {signal.Signals(signum).name}: stopping {len(self.procs)} role(s)",
          file=sys.stderr, flush=True)
    self.stop_all()
    raise KeyboardInterrupt

  def log_path(self, name: str) -> str:
    return os.path.join(self.log_dir, f"{name}.log")

  def start(self, role: Role) -> subprocess.Popen:
    """Starts `role` in its own process group, appending to its log file."""
    if role.name in self.procs and self.procs[role.name].poll() is None:
      raise RoleError(f"role {role.name!r} is already running (pid {self.procs[role.name].pid})")
    if not role.argv:
      raise RoleError(f"role {role.name!r} has an empty argv")
    log = open(self.log_path(role.name), "ab")  # noqa: SIM115 - closed in stop()
    log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(role.argv)}\n".encode())
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **role.env}
    try:
      proc = subprocess.Popen(role.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=role.cwd, start_new_session=True)
    except OSError as e:
      log.close()
      raise RoleError(f"role {role.name!r} failed to start {role.argv[0]!r}: {e}") from None
    self.procs[role.name], self.roles[role.name], self._logs[role.name] = proc, role, log
    self._stopped.discard(role.name)
    return proc

  def wait_ready(self, name: str, timeout_s: float = 300.0, interval_s: float = 0.5) -> float:
    """Polls the role's readiness check; returns seconds waited. Raises if it dies or times out."""
    role, proc = self.roles[name], self.procs[name]
    t0 = time.monotonic()
    while True:
      if role.ready is None or role.ready():
        return time.monotonic() - t0
      if proc.poll() is not None:
        raise RoleError(f"role {name!r} exited with code {proc.returncode} before it was ready; "
                        f"log {self.log_path(name)}:\n{log_tail(self.log_path(name))}")
      if time.monotonic() - t0 > timeout_s:
        raise RoleError(f"role {name!r} not ready after {timeout_s:.0f}s; log "
                        f"{self.log_path(name)}:\n{log_tail(self.log_path(name))}")
      time.sleep(interval_s)

  def returncode(self, name: str) -> int | None:
    return self.procs[name].poll()

  def failed(self) -> dict[str, int]:
    """Roles that exited with a non-zero code: {name: code}."""
    return {n: p.returncode for n, p in self.procs.items()
            if p.poll() is not None and p.returncode != 0}

  def wait(self, name: str, timeout_s: float | None = None, check: Sequence[str] = (),
           interval_s: float = 0.5) -> int:
    """Waits for role `name` to exit; returns its code. Raises if a role in `check` fails first."""
    t0 = time.monotonic()
    proc = self.procs[name]
    while proc.poll() is None:
      bad = {n: c for n, c in self.failed().items() if n in check}
      if bad:
        n = next(iter(bad))
        raise RoleError(f"role {n!r} failed with code {bad[n]} while waiting for {name!r}; log "
                        f"{self.log_path(n)}:\n{log_tail(self.log_path(n))}")
      if timeout_s is not None and time.monotonic() - t0 > timeout_s:
        raise RoleError(f"role {name!r} still running after {timeout_s:.0f}s; log "
                        f"{self.log_path(name)}:\n{log_tail(self.log_path(name))}")
      time.sleep(interval_s)
    return proc.returncode

  def stop(self, name: str, grace_s: float | None = None) -> int | None:
    """SIGTERM to the role's process group, SIGKILL after the grace period; returns exit code."""
    proc = self.procs.get(name)
    if proc is None:
      return None
    if name in self._stopped:
      return proc.returncode
    grace = self.grace_s if grace_s is None else grace_s
    if proc.poll() is None:
      _signal_group(proc, signal.SIGTERM)
      try:
        proc.wait(grace)
      except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)
    else:  # The leader exited; children it left in the group must not outlive the run.
      _signal_group(proc, signal.SIGKILL)
    self._stopped.add(name)
    log = self._logs.pop(name, None)
    if log is not None:
      log.write(f"=== {time.strftime('%H:%M:%S')} stopped (code {proc.returncode})\n".encode())
      log.close()
    return proc.returncode

  def stop_all(self, grace_s: float | None = None) -> dict[str, int | None]:
    """Stops every role (newest first, so workers go before the servers they call)."""
    return {n: self.stop(n, grace_s) for n in reversed(list(self.procs))}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass

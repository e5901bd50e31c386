"""Local sandbox: a temp dir and rlimited subprocesses. It does NOT isolate; use it only for tests
and machines without docker, with code you trust.

Paths under /workspace are mapped onto the temp dir, so agents and graders can use the same paths
as with docker. The same runner script bounds time and output.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import logging

from klong_jax.sandbox import image as image_lib
from klong_jax.sandbox.base import (
    WORKSPACE,
    ExecResult,
    Limits,
    SandboxError,
    SubmissionError,
    check_collect_limits,
    exec_result,
    parse_runner_output,
)

_WARNED = False


class LocalSandbox:
  """Subprocesses in a temp dir with rlimits (address space, file size); NOT isolating."""

  def __init__(self, limits: Limits):
    global _WARNED
    if not _WARNED:
      logging.warning("LOCAL SANDBOX BACKEND: commands run on this host as %s with only rlimits; "
                      "it does NOT isolate untrusted code (no network/filesystem isolation).",
                      os.environ.get("USER", os.getuid()))
      _WARNED = True
    self.limits = limits
    self.root = tempfile.mkdtemp(prefix="klong-local-sb-")
    self.pids = tempfile.mkdtemp(prefix="klong-local-pids-")
    self.runner = str(image_lib.runner_path())
    self.start_s = 0.0
    self._closed = False

  def _map(self, path: str) -> str:
    """Maps a sandbox path (/workspace/...) onto the temp dir."""
    if path == WORKSPACE or path.startswith(WORKSPACE + "/"):
      return self.root + path[len(WORKSPACE):]
    return path

  def exec(self, cmd: str, timeout_s: float, workdir: str = WORKSPACE,
           env: dict[str, str] | None = None) -> ExecResult:
    """Runs `bash -c cmd` in the mapped workdir with rlimits, bounded by timeout_s."""
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    lim = self.limits
    cwd = self._map(workdir)
    os.makedirs(cwd, exist_ok=True)
    cmd = cmd.replace(WORKSPACE, self.root)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.root,
                "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = [sys.executable, self.runner, "--cmd", cmd, "--cwd", cwd, "--timeout", str(timeout_s),
            "--grace", str(lim.kill_grace_s), "--max_output", str(lim.max_output),
            "--rlimit_as", str(lim.mem_bytes * 4), "--rlimit_fsize", str(lim.workspace_bytes),
            "--pidfile", os.path.join(self.pids, f"exec-{time.monotonic_ns()}")]
    t0 = time.time()
    try:
      proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
                            timeout=timeout_s + lim.kill_grace_s + 10)
    except subprocess.TimeoutExpired as e:
      return ExecResult(124, (e.stdout or b"").decode("utf-8", "replace"), True, False,
                        time.time() - t0)
    except OSError as e:
      raise SandboxError(f"local exec failed: {e}") from e
    text, st = parse_runner_output(proc.stdout, proc.returncode)
    return exec_result(text.replace(self.root, WORKSPACE), st, time.time() - t0)

  def put_files(self, files: dict[str, bytes], dest: str = WORKSPACE) -> None:
    """Writes {relative path: bytes} under dest."""
    base = Path(self._map(dest))
    for rel, data in files.items():
      rel = rel.replace("\\", "/")
      if rel.startswith("/") or ".." in rel.split("/"):
        raise ValueError(f"file path {rel!r} must be relative and stay inside {dest}")
      p = base / rel
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_bytes(data)
      if rel.endswith(".sh"):
        p.chmod(0o755)

  def get_dir(self, src: str, host_dest: str) -> None:
    """Copies the directory src into host_dest, as the docker backend does: regular files only
    (links and special files left out), SubmissionError past max_get_bytes/files or when a file
    cannot be read."""
    s = self._map(src)
    if not os.path.lexists(s):
      raise FileNotFoundError(f"{src} does not exist in the local sandbox")
    os.makedirs(host_dest, exist_ok=True)
    if os.path.islink(s) or not os.path.isdir(s):
      return  # docker copies such a path as one entry, which the extraction drops.
    check_collect_limits(self, src, self.limits)
    lim, entries, size = self.limits, 0, 0

    def unreadable(e: OSError) -> None:
      rel = os.path.relpath(e.filename or s, s)
      raise SubmissionError("unreadable", f"{src}/{rel} cannot be read ({e.strerror}); make it "
                            "readable (chmod u+r) or remove it") from None

    for dirpath, dirnames, names in os.walk(s, onerror=unreadable):
      out_dir = os.path.join(host_dest, os.path.relpath(dirpath, s))
      os.makedirs(out_dir, exist_ok=True)
      entries += len(dirnames) + len(names)
      if entries > lim.max_get_files:
        raise SubmissionError("too_many_files", f"{src} holds more than {lim.max_get_files} "
                              "files and directories (max_get_files)")
      for name in names:
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
          continue
        size += st.st_size
        if size > lim.max_get_bytes:
          raise SubmissionError("too_large", f"{src} holds more than max_get_bytes="
                                f"{lim.max_get_bytes} bytes of files")
        try:
          shutil.copyfile(path, os.path.join(out_dir, name))
        except PermissionError as e:
          unreadable(e)
        os.chmod(os.path.join(out_dir, name), 0o755 if st.st_mode & 0o100 else 0o644)

  def interrupt(self) -> None:
    """Kills the process groups of all running execs (the outer wall guard calls this)."""
    for name in os.listdir(self.pids):
      try:
        with open(os.path.join(self.pids, name)) as f:
          os.killpg(int(f.read().strip()), signal.SIGKILL)
      except (OSError, ValueError):
        pass

  def alive(self) -> bool:
    return not self._closed

  def info(self) -> dict:
    return {"backend": "local", "root": self.root, "isolating": False}

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self.interrupt()
      shutil.rmtree(self.root, ignore_errors=True)
      shutil.rmtree(self.pids, ignore_errors=True)

  def __enter__(self) -> LocalSandbox:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

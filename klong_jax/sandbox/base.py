"""Backend-neutral sandbox interface: run bounded commands, move files in and out.

Callers (agent tools, graders, the worker) use `make_sandbox(backend, **limits)` and the `Sandbox`
protocol only; `docker_backend` isolates, `local_backend` does not (it says so loudly).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Protocol

WORKSPACE = "/workspace"
SUBMISSION = "/workspace/submission"
TRAILER = "__KLONG_RUNNER_EXIT__"  # Must match sandbox/runner.py.


class SandboxError(RuntimeError):
  """An infrastructure failure (engine down, container died); callers retry, then infra_error."""


class SandboxSetupError(SandboxError):
  """A host setup problem no retry can fix (the sandbox image is missing): fail at once."""


class SubmissionError(SandboxError):
  """The agent's files cannot be collected (too large, too many, unreadable, missing).

  Agent-caused, so never retried: the worker grades it as an empty submission and records `kind`.
  A SandboxError subclass so older callers still stop on it; catch it before SandboxError.
  """

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class ExecResult:
  """What one command did: exit code, bounded output, and whether a limit was hit."""

  exit_code: int
  output: str
  timed_out: bool
  truncated: bool
  duration_s: float
  pids_limited: bool = False  # A fork failed at the sandbox's process limit during the command.
  pids_max: int = 0           # That limit (0: unknown).
  # CPU seconds the command used: the container cgroup's cpu.stat usage_usec over the exec
  # (docker) or the command's rusage (local); None when the runner could not measure it.
  cpu_s: float | None = None

  @property
  def ok(self) -> bool:
    return self.exit_code == 0 and not self.timed_out


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandbox (every backend reads what it can enforce)."""

  image: str = ""                        # docker: empty = the current content tag.
  mem_bytes: int = 1 << 30               # RAM (+swap) of the container.
  cpus: float = 1.0                      # docker nano_cpus = cpus * 1e9.
  pids: int = 256                        # Max processes/threads (fork bombs stop here).
  workspace_bytes: int = 512 << 20       # Size of the writable /workspace.
  tmp_bytes: int = 64 << 20              # Size of /tmp and $HOME.
  max_output: int = 64 * 1024            # Bytes of output kept per exec (head + tail).
  network: str = "none"                  # "none", or a docker network name (allow-list mode).
  kill_grace_s: float = 2.0              # SIGTERM -> SIGKILL grace at a timeout.
  max_get_bytes: int = 256 << 20         # Cap on bytes copied out by get_dir.
  max_get_files: int = 50_000            # Cap on files + directories copied out by get_dir.

  @classmethod
  def from_kwargs(cls, **kw: Any) -> Limits:
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kw) - names)
    if bad:
      raise ValueError(f"unknown sandbox limit(s) {bad}; known: {sorted(names)}")
    return cls(**kw)


class Sandbox(Protocol):
  """One isolated workspace for one episode."""

  def exec(self, cmd: str, timeout_s: float, workdir: str = WORKSPACE,
           env: dict[str, str] | None = None) -> ExecResult: ...

  def put_files(self, files: dict[str, bytes], dest: str = WORKSPACE) -> None: ...

  def get_dir(self, src: str, host_dest: str) -> None: ...

  def close(self) -> None: ...

  def __enter__(self) -> Sandbox: ...

  def __exit__(self, *exc: object) -> None: ...


def make_sandbox(backend: str = "docker", **limits: Any) -> Sandbox:
  """Creates a sandbox: "docker" (isolating, the default) or "local" (NOT isolating)."""
  lim = Limits.from_kwargs(**limits)
  if backend == "docker":
    from klong_jax.sandbox.docker_backend import DockerSandbox
    return DockerSandbox(lim)
  if backend == "local":
    from klong_jax.sandbox.local_backend import LocalSandbox
    return LocalSandbox(lim)
  raise ValueError(f"unknown sandbox backend {backend!r}; use 'docker' or 'local'")


def parse_runner_output(raw: bytes, fallback_exit: int | None = None) -> tuple[str, dict]:
  """Splits runner output into (text, status); without a trailer the runner died (e.g. OOM)."""
  idx = raw.rfind(("\n" + TRAILER + " ").encode())
  if idx >= 0:
    try:
      status = json.loads(raw[idx + len(TRAILER) + 2:].decode())
      return raw[:idx].decode("utf-8", "replace"), status
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass
  code = 137 if fallback_exit is None else fallback_exit
  text = raw.decode("utf-8", "replace") + f"\n[runner ended without status; exit {code}]"
  return text, {"exit_code": code, "timed_out": False, "truncated": False}


def exec_result(text: str, status: dict, duration_s: float) -> ExecResult:
  """An ExecResult from the runner's output text and status trailer."""
  return ExecResult(exit_code=int(status.get("exit_code", 1)), output=text,
                    timed_out=bool(status.get("timed_out")),
                    truncated=bool(status.get("truncated")), duration_s=duration_s,
                    pids_limited=bool(status.get("pids_limited")),
                    pids_max=int(status.get("pids_max") or 0),
                    cpu_s=(None if status.get("cpu_usec") is None
                           else int(status["cpu_usec"]) / 1e6))


# Run in the sandbox (python3 -c SCRIPT DIR MAX_ENTRIES): one JSON line {entries, bytes, largest},
# where bytes is the apparent size of the regular files (a sparse file counts in full, as a tar
# copies it). It stops counting past MAX_ENTRIES.
_MEASURE = r"""
import json, os, stat, sys
root, cap = sys.argv[1], int(sys.argv[2])
entries, size, largest = 0, 0, []
stack = [] if os.path.islink(root) else [root]  # A link is copied as a link: nothing to count.
while stack:
    try:
        found = list(os.scandir(stack.pop()))
    except OSError:
        continue
    for e in found:
        entries += 1
        if entries > cap:
            stack = []
            break
        st = e.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            stack.append(e.path)
        elif stat.S_ISREG(st.st_mode):
            size += st.st_size
            largest = sorted(largest + [(st.st_size, os.path.relpath(e.path, root))])[-3:]
print(json.dumps({"entries": entries, "bytes": size, "largest": largest[::-1]}))
"""


def check_collect_limits(sandbox: Sandbox, src: str, limits: Limits) -> None:
  """Measures `src` inside the sandbox and raises SubmissionError past max_get_bytes/files.

  Runs before a copy so the agent gets a clear reason; if it cannot measure, the copy's own
  caps still hold.
  """
  res = sandbox.exec(f"python3 -c {shlex.quote(_MEASURE)} {shlex.quote(src)} "
                     f"{limits.max_get_files}", timeout_s=120)
  try:
    m = json.loads(res.output.strip().splitlines()[-1])
  except (IndexError, json.JSONDecodeError):
    return
  if m["entries"] > limits.max_get_files:
    raise SubmissionError("too_many_files", (
        f"{src} holds more than {limits.max_get_files} files and directories (max_get_files); "
        "keep generated data and environments out of the submission"))
  if m["bytes"] > limits.max_get_bytes:
    big = ", ".join(f"{p} ({n / 2**20:.1f} MiB)" for n, p in m["largest"])
    raise SubmissionError("too_large", (
        f"{src} holds {m['bytes'] / 2**20:.1f} MiB of files (sparse files count in full), over "
        f"the limit of {limits.max_get_bytes / 2**20:.0f} MiB (max_get_bytes); largest: {big}"))


def files_from_dir(root: str, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
  """Reads every regular file under `root` into {relative path: bytes} (symlinks skipped).

  A name with a backslash raises SubmissionError (tar_files would read it as a path separator).
  """
  out = {}
  base = Path(root)
  for p in sorted(base.rglob("*")):
    rel = p.relative_to(base).as_posix()
    if p.is_symlink() or not p.is_file() or any(rel.split("/")[0] == s for s in skip):
      continue
    if "\\" in rel:
      raise SubmissionError("bad_name", f"file name {rel!r} has a backslash, which cannot be "
                            "copied into the grading sandbox; rename the file")
    out[rel] = p.read_bytes()
  return out

def collect_submission(sb: Sandbox, host_dir: str, src: str = SUBMISSION
                       ) -> tuple[dict[str, bytes], dict[str, str]]:
  """Copies the submission out of `sb` into host_dir and reads it -> (files, failure).

  An agent-caused failure (SubmissionError: too large, too many files, a bad name; or the dir
  removed) is the agent's outcome, never an infra retry: host_dir is left empty and `failure`
  is {"failure_reason": kind, "failure_detail": message} for the record.
  """
  try:
    sb.get_dir(src, host_dir)
    return files_from_dir(host_dir), {}
  except SubmissionError as e:
    failure = {"failure_reason": f"submission_{e.kind}", "failure_detail": str(e)[:2000]}
  except FileNotFoundError as e:
    failure = {"failure_reason": "submission_missing", "failure_detail": str(e)[:2000]}
  shutil.rmtree(host_dir, ignore_errors=True)
  os.makedirs(host_dir, exist_ok=True)
  return {}, failure


def tar_files(files: dict[str, bytes], uid: int = 1000, gid: int = 1000) -> bytes:
  """An in-memory tar of `files` (relative paths) owned by uid/gid, for put_archive."""
  buf = io.BytesIO()
  now = time.time()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    dirs: set[str] = set()
    for rel, data in sorted(files.items()):
      rel = _safe_rel(rel)
      parts = rel.split("/")
      for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in dirs:
          dirs.add(d)
          info = tarfile.TarInfo(d)
          info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
          info.uid, info.gid = uid, gid
          tar.addfile(info)
      info = tarfile.TarInfo(rel)
      info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o755 if rel.endswith(
          ".sh") else 0o644, uid, gid, now
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _safe_rel(rel: str) -> str:
  rel = rel.replace("\\", "/")
  while rel.startswith("./"):
    rel = rel[2:]
  if rel.startswith("/") or ".." in rel.split("/") or not rel:
    raise ValueError(f"file path {rel!r} must be relative and stay inside the destination")
  return rel


def extract_tar_stream(chunks, host_dest: str, max_bytes: int, strip: int = 1,
                       max_files: int = 50_000) -> int:
  """Safely extracts a tar stream (from get_archive) into host_dest; returns bytes written.

  Strips `strip` leading path components, refuses absolute/parent paths and links, and stops
  with SubmissionError past `max_bytes` or `max_files` entries (a hostile sandbox cannot fill
  the host disk).
  """
  # Tar headers and padding (and long-name records) come on top of the file bytes.
  stream_cap = max_bytes + (max_files + 1) * 4096 + (1 << 20)

  class _Stream(io.RawIOBase):
    def __init__(self, it):
      self._it, self._buf, self.total = iter(it), b"", 0

    def readable(self) -> bool:
      return True

    def readinto(self, b) -> int:
      while not self._buf:
        try:
          self._buf = next(self._it)
        except StopIteration:
          return 0
      n = min(len(b), len(self._buf))
      b[:n], self._buf = self._buf[:n], self._buf[n:]
      self.total += n
      if self.total > stream_cap:
        raise SubmissionError("too_large", f"get_dir: the archive exceeds {stream_cap} bytes "
                              f"(max_get_bytes={max_bytes}, max_get_files={max_files})")
      return n

  dest = Path(host_dest)
  dest.mkdir(parents=True, exist_ok=True)
  written = entries = 0
  with tarfile.open(fileobj=io.BufferedReader(_Stream(chunks)), mode="r|") as tar:
    for m in tar:
      entries += 1
      if entries > max_files + 1:  # + 1: the copied directory itself.
        raise SubmissionError("too_many_files", f"get_dir: more than {max_files} files and "
                              "directories (max_get_files); keep generated data out of it")
      parts = [p for p in m.name.split("/") if p not in ("", ".")][strip:]
      if not parts or ".." in parts or m.name.startswith("/"):
        continue
      target = dest.joinpath(*parts)
      if m.isdir():
        target.mkdir(parents=True, exist_ok=True)
      elif m.isfile():
        written += m.size
        if written > max_bytes:
          raise SubmissionError("too_large", f"get_dir: files exceed max_get_bytes={max_bytes}; "
                                "keep large data out of the copied directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        with open(target, "wb") as f:
          while True:
            block = src.read(1 << 20)
            if not block:
              break
            f.write(block)
        os.chmod(target, 0o755 if m.mode & 0o100 else 0o644)
  return written


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists on this host (owners of claims and containers)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True

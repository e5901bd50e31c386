"""Docker sandbox: one hardened container per episode (see sandbox/HARDENING.md).

Non-root user, no network by default, memory/CPU/pid limits, all capabilities dropped,
no-new-privileges, read-only root, a size-bounded tmpfs-backed volume at /workspace. Every exec
goes through the in-container runner (process group, deadline, bounded output) and is also
guarded on the host: past the deadline the host kills the group from a second exec.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from absl import logging

from klong_jax.sandbox import image as image_lib
from klong_jax.sandbox.base import (
  WORKSPACE,
  ExecResult,
  Limits,
  SandboxError,
  SandboxSetupError,
  check_collect_limits,
  exec_result,
  extract_tar_stream,
  parse_runner_output,
  pid_alive,
  tar_files,
)

LABEL = "klong.sandbox"
OWNER_LABEL = "klong.owner"
UID = 1000
# The container's init and `sleep` run as nobody: the agent (UID) cannot signal them, so
# `kill -9 -1` or `pkill sleep` cannot stop the container (an agent-caused "infra" failure).
KEEPER_UID = 65534
RUNNER = "/opt/klong/runner.py"
HOST_SLACK_S = 10.0  # Host guard fires this long after the runner's own deadline + grace.


def _owner() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


def _client():
  import docker
  try:
    return docker.from_env(timeout=120)
  except Exception as e:  # noqa: BLE001
    raise SandboxError(f"docker engine unreachable ({e})") from e


def gc_leaked(only_dead_owners: bool = True) -> int:
  """Removes sandbox containers/volumes left by dead processes on this host; returns the count.

  Called at worker start. With only_dead_owners=False every klong sandbox on the engine goes.
  """
  client = _client()
  host = socket.gethostname()
  removed = 0
  # ignore_removed: another worker starting at the same time may remove one mid-listing.
  for c in client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True):
    owner = c.labels.get(OWNER_LABEL, "")
    h, _, pid = owner.rpartition(":")
    if only_dead_owners and (h != host or not pid.isdigit() or pid_alive(int(pid))):
      continue
    try:
      c.remove(force=True, v=True)
      removed += 1
    except Exception as e:  # noqa: BLE001 - best effort; report and go on.
      logging.warning("gc: could not remove container %s: %s", c.name, e)
  for v in client.volumes.list(filters={"label": LABEL}):
    owner = (v.attrs.get("Labels") or {}).get(OWNER_LABEL, "")
    h, _, pid = owner.rpartition(":")
    if only_dead_owners and (h != host or not pid.isdigit() or pid_alive(int(pid))):
      continue
    try:
      v.remove(force=True)
      removed += 1
    except Exception:  # noqa: BLE001 - still in use by a container being removed.
      pass
  return removed


class DockerSandbox:
  """A hardened container; create with `make_sandbox("docker", **limits)`."""

  def __init__(self, limits: Limits):
    import docker
    self.limits = limits
    self.client = _client()
    self.image = limits.image or image_lib.image_tag()
    self.name = f"klong-sb-{uuid.uuid4().hex[:12]}"
    labels = {LABEL: "1", OWNER_LABEL: _owner()}
    t0 = time.time()
    try:
      self.client.images.get(self.image)
    except docker.errors.ImageNotFound:
      raise SandboxSetupError(f"sandbox image {self.image} is missing; build it with "
                         "`python -m klong_jax.sandbox.image --ensure` (or `make image`)") from None
    except Exception as e:  # noqa: BLE001
      raise SandboxError(f"docker engine error: {e}") from e
    try:
      self.volume = self.client.volumes.create(
          name=self.name, driver="local", labels=labels,
          driver_opts={"type": "tmpfs", "device": "tmpfs",
                       "o": f"size={limits.workspace_bytes},uid={UID},gid={UID},mode=0755"})
      small = f"size={limits.tmp_bytes},mode=1777"
      self.container = self.client.containers.run(
          self.image, command=["sleep", "infinity"], name=self.name, detach=True,
          user=f"{KEEPER_UID}:{KEEPER_UID}", working_dir=WORKSPACE, labels=labels, init=True,
          network_mode=limits.network, mem_limit=limits.mem_bytes,
          memswap_limit=limits.mem_bytes, nano_cpus=int(limits.cpus * 1e9),
          pids_limit=limits.pids, cap_drop=["ALL"], security_opt=["no-new-privileges"],
          read_only=True, volumes={self.name: {"bind": WORKSPACE, "mode": "rw"}},
          tmpfs={"/tmp": small, "/home/agent": f"size={limits.tmp_bytes},uid={UID},gid={UID}"},
          ulimits=[docker.types.Ulimit(name="nofile", soft=4096, hard=4096)])
    except Exception as e:  # noqa: BLE001
      self._cleanup()
      raise SandboxError(f"could not start sandbox container: {e}") from e
    self.start_s = time.time() - t0
    self._closed = False

  # -- exec ------------------------------------------------------------------------------------

  def exec(self, cmd: str, timeout_s: float, workdir: str = WORKSPACE,
           env: dict[str, str] | None = None) -> ExecResult:
    """Runs `bash -c cmd` bounded by timeout_s; kills its process group at the deadline."""
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    lim = self.limits
    pidfile = f"/tmp/.klong-exec-{uuid.uuid4().hex[:10]}"
    argv = ["python3", RUNNER, "--cmd", cmd, "--cwd", workdir, "--timeout", str(timeout_s),
            "--grace", str(lim.kill_grace_s), "--max_output", str(lim.max_output),
            "--pidfile", pidfile, "--cgroup_pids"]
    t0 = time.time()
    try:
      ex = self.client.api.exec_create(self.container.id, argv, user=f"{UID}:{UID}",
                                       workdir=WORKSPACE, environment=env or {})
      stream = self.client.api.exec_start(ex["Id"], stream=True)
    except Exception as e:  # noqa: BLE001
      raise SandboxError(f"exec failed in {self.name}: {e}") from e
    buf = bytearray()
    cap = 2 * lim.max_output + 4096  # Host-side cap even if the runner misbehaves.
    err: list[BaseException] = []

    def pump() -> None:
      try:
        for chunk in stream:
          if len(buf) < cap:
            buf.extend(chunk[:cap - len(buf)])
      except BaseException as e:  # noqa: BLE001 - reported below.
        err.append(e)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    th.join(timeout_s + lim.kill_grace_s + HOST_SLACK_S)
    host_killed = th.is_alive()
    if host_killed:
      logging.warning("host guard: exec in %s overran, killing its process group", self.name)
      self._kill_from_host(pidfile)
      th.join(5.0)
    duration = time.time() - t0
    try:
      fallback = self.client.api.exec_inspect(ex["Id"]).get("ExitCode")
    except Exception:  # noqa: BLE001
      fallback = None
    if err and not buf:
      raise SandboxError(f"exec stream failed in {self.name}: {err[0]}")
    text, st = parse_runner_output(bytes(buf), fallback)
    res = exec_result(text, st, duration)
    res.truncated = res.truncated or len(buf) >= cap
    if host_killed:
      res.exit_code, res.timed_out = 124, True
    return res

  def _kill_from_host(self, pidfile: str) -> None:
    kill = f'g=$(cat {pidfile} 2>/dev/null) && kill -KILL -- -"$g"; pkill -KILL -f "{RUNNER}"'
    try:
      self.container.exec_run(["bash", "-c", kill], user=f"{UID}:{UID}")
    except Exception as e:  # noqa: BLE001
      logging.warning("host kill failed in %s: %s", self.name, e)

  def interrupt(self) -> None:
    """Kills the process groups of all running execs (the outer wall guard calls this)."""
    kill = 'for f in /tmp/.klong-exec-*; do [ -f "$f" ] && kill -KILL -- -"$(cat "$f")"; done; true'
    try:
      self.container.exec_run(["bash", "-c", kill], user=f"{UID}:{UID}")
    except Exception as e:  # noqa: BLE001
      logging.warning("interrupt failed in %s: %s", self.name, e)

  # -- files -----------------------------------------------------------------------------------

  def put_files(self, files: dict[str, bytes], dest: str = WORKSPACE) -> None:
    """Writes {relative path: bytes} under dest (created if missing), owned by the agent user."""
    if not dest.startswith(WORKSPACE):
      raise ValueError(f"put_files dest {dest!r} must be under {WORKSPACE} (the only writable dir)")
    if dest != WORKSPACE:
      r = self.exec(f"mkdir -p '{dest}'", timeout_s=30)
      if not r.ok:
        raise SandboxError(f"could not create {dest}: {r.output}")
    try:
      ok = self.container.put_archive(dest, tar_files(files, UID, UID))
    except Exception as e:  # noqa: BLE001
      raise SandboxError(f"put_files into {self.name}:{dest} failed: {e}") from e
    if not ok:
      raise SandboxError(f"put_files into {self.name}:{dest} was refused")

  def get_dir(self, src: str, host_dest: str) -> None:
    """Copies the directory src out of the container into host_dest (bounded by max_get_bytes
    and max_get_files: past them SubmissionError; links and special files are left out)."""
    import docker
    check_collect_limits(self, src, self.limits)
    try:
      chunks, _ = self.container.get_archive(src.rstrip("/") or "/")
      extract_tar_stream(chunks, host_dest, self.limits.max_get_bytes, strip=1,
                         max_files=self.limits.max_get_files)
    except docker.errors.NotFound:
      if not self.alive():
        raise SandboxError(f"get_dir {src}: sandbox {self.name} is gone") from None
      raise FileNotFoundError(f"{src} does not exist in sandbox {self.name}") from None
    except SandboxError:
      raise
    except Exception as e:  # noqa: BLE001
      raise SandboxError(f"get_dir {src} from {self.name} failed: {e}") from e

  # -- lifecycle -------------------------------------------------------------------------------

  def alive(self) -> bool:
    try:
      self.container.reload()
      return self.container.status == "running"
    except Exception:  # noqa: BLE001
      return False

  def info(self) -> dict:
    return {"backend": "docker", "image": self.image, "name": self.name,
            "start_s": round(self.start_s, 3)}

  def _cleanup(self) -> None:
    c = getattr(self, "container", None)
    if c is not None:
      try:
        c.remove(force=True, v=True)
      except Exception as e:  # noqa: BLE001
        logging.warning("could not remove %s: %s", self.name, e)
    v = getattr(self, "volume", None)
    if v is not None:
      for _ in range(5):
        try:
          v.remove(force=True)
          break
        except Exception:  # noqa: BLE001 - container removal may lag.
          time.sleep(0.2)

  def close(self) -> None:
    if not getattr(self, "_closed", True):
      self._closed = True
      self._cleanup()

  def __enter__(self) -> DockerSandbox:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

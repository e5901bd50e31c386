"""In-sandbox command runner: one bounded command, its process group killed at the deadline.

Runs inside the container (and, for the `local` backend, on the host), using the standard library
only. It starts `bash -c CMD` in a new session, records the process-group id in a pid file so the
host can kill the group from outside, keeps the first and last bytes of the merged stdout/stderr
(dropping the middle with a marker), kills the whole group on timeout (SIGTERM, then SIGKILL after
a grace period) and when the command returns (background jobs must `setsid` to outlive it), and
ends its output with one trailer line the host parses:
`\\n<TRAILER> {"exit_code": .., "timed_out": .., "truncated": .., "output_bytes": ..,
"pids_limited": .., "pids_max": .., "cpu_usec": ..}`. With --cgroup_pids (docker), `pids_limited`
says a fork failed at the container's pids limit while the command ran (the cgroup's `max` event
counter grew) and `cpu_usec` is the container cgroup's cpu.stat usage_usec over the command;
without it (local), the CPU time of the command's waited-for processes (rusage). `cpu_usec` is
null when neither can be read (the token budget clock then charges a fixed cost).
"""

import argparse
import errno
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time

TRAILER = "__KLONG_RUNNER_EXIT__"
PIDS_DIRS = ("/sys/fs/cgroup", "/sys/fs/cgroup/pids")  # cgroup v2, then v1.
MARKER = "\n[... output truncated: {n} bytes omitted ...]\n"


def _kill_group(pgid: int, sig: int) -> None:
  try:
    os.killpg(pgid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _pids_events() -> tuple[int, int] | None:
  """(forks refused at the pids limit so far, the limit) of this cgroup; None if unreadable."""
  for d in PIDS_DIRS:
    try:
      with open(os.path.join(d, "pids.events")) as f:
        events = dict(line.split() for line in f if line.strip())
      with open(os.path.join(d, "pids.max")) as f:
        limit = f.read().strip()
      return int(events.get("max", 0)), int(limit) if limit.isdigit() else 0
    except (OSError, ValueError):
      continue
  return None


def _cgroup_cpu_usec() -> int | None:
  """usage_usec of this cgroup's cpu.stat (v2), or cpuacct.usage (v1, ns); None if unreadable."""
  try:
    with open("/sys/fs/cgroup/cpu.stat") as f:
      for line in f:
        key, _, value = line.partition(" ")
        if key == "usage_usec":
          return int(value)
  except (OSError, ValueError):
    pass
  for path in ("/sys/fs/cgroup/cpuacct/cpuacct.usage", "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage"):
    try:
      with open(path) as f:
        return int(f.read().strip()) // 1000
    except (OSError, ValueError):
      continue
  return None


def _children_cpu_usec() -> int:
  """CPU time (user + system) of this process's waited-for children, in microseconds."""
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return int((ru.ru_utime + ru.ru_stime) * 1e6)


def _cpu_usec(cgroup: bool) -> int | None:
  return _cgroup_cpu_usec() if cgroup else _children_cpu_usec()


def _limits(args: argparse.Namespace):
  """Returns a preexec function applying rlimits (used by the non-isolating local backend)."""
  def apply() -> None:
    if args.rlimit_as:
      resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
    if args.rlimit_fsize:
      resource.setrlimit(resource.RLIMIT_FSIZE, (args.rlimit_fsize, args.rlimit_fsize))
    if args.rlimit_nproc:
      resource.setrlimit(resource.RLIMIT_NPROC, (args.rlimit_nproc, args.rlimit_nproc))
  return apply


def run(args: argparse.Namespace) -> dict:
  """Runs the command to completion or deadline; writes bounded output to stdout."""
  head_cap = args.max_output // 2
  tail_cap = args.max_output - head_cap
  head, tail = bytearray(), bytearray()
  total = 0
  pids_before = _pids_events() if args.cgroup_pids else None
  cpu_before = _cpu_usec(args.cgroup_pids)
  try:
    proc = subprocess.Popen(
        ["/bin/bash", "-c", args.cmd], cwd=args.cwd, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_limits(args))
  except OSError as e:  # EAGAIN: the process limit is already used up (e.g. a detached bomb).
    return _emit(f"could not start the command: {e}".encode(),
                 {"exit_code": 126, "timed_out": False, "truncated": False, "output_bytes": 0,
                  "pids_limited": e.errno == errno.EAGAIN and pids_before is not None,
                  "pids_max": pids_before[1] if pids_before else 0}, args.pidfile)
  pgid = proc.pid
  if args.pidfile:
    with open(args.pidfile + ".tmp", "w") as f:
      f.write(str(pgid))
    os.replace(args.pidfile + ".tmp", args.pidfile)
  deadline = time.monotonic() + args.timeout
  sel = selectors.DefaultSelector()
  fd = proc.stdout.fileno()
  os.set_blocking(fd, False)
  sel.register(fd, selectors.EVENT_READ)
  timed_out = False
  drain_until = None
  while True:
    now = time.monotonic()
    if proc.poll() is not None and drain_until is None:
      # Background children may keep the pipe open: drain briefly, then stop reading.
      drain_until = now + 0.2
    if drain_until is not None and now >= drain_until:
      break
    if now >= deadline:
      timed_out = True
      _kill_group(pgid, signal.SIGTERM)
      grace_end = now + args.grace
      while proc.poll() is None and time.monotonic() < grace_end:
        time.sleep(0.05)
      _kill_group(pgid, signal.SIGKILL)
      break
    wait = min(deadline - now, 0.1 if drain_until is None else drain_until - now)
    for _ in sel.select(timeout=max(wait, 0.0)):
      try:
        data = os.read(fd, 1 << 16)
      except BlockingIOError:
        continue
      if not data:
        drain_until = time.monotonic()
        break
      total += len(data)
      room = head_cap - len(head)
      if room > 0:
        head += data[:room]
        data = data[room:]
      if data:
        tail += data
        if len(tail) > tail_cap:
          del tail[:len(tail) - tail_cap]
  sel.close()
  try:
    exit_code = proc.wait(timeout=args.grace + 1)
  except subprocess.TimeoutExpired:
    exit_code = None
  # Leftover background processes of this command die with it (detach on purpose with setsid).
  _kill_group(pgid, signal.SIGKILL)
  if exit_code is None:
    exit_code = proc.wait()
  if timed_out:
    exit_code = 124 if exit_code in (0, None) or exit_code < 0 else exit_code
  elif exit_code < 0:
    exit_code = 128 - exit_code
  truncated = total > len(head) + len(tail)
  pids_after = _pids_events() if pids_before is not None else None
  pids_limited = pids_after is not None and pids_after[0] > pids_before[0]
  cpu_after = _cpu_usec(args.cgroup_pids)
  cpu_usec = (cpu_after - cpu_before if cpu_before is not None and cpu_after is not None
              else None)
  body = bytes(head)
  if truncated:
    body += MARKER.format(n=total - len(head) - len(tail)).encode()
  body += bytes(tail)
  return _emit(body, {"exit_code": exit_code, "timed_out": timed_out, "truncated": truncated,
                      "output_bytes": total, "pids_limited": pids_limited,
                      "pids_max": pids_after[1] if pids_after else 0, "cpu_usec": cpu_usec},
               args.pidfile)


def _emit(body: bytes, status: dict, pidfile: str) -> dict:
  """Writes the output and the status trailer, and removes the pid file."""
  out = sys.stdout.buffer
  out.write(body)
  out.write(f"\n{TRAILER} {json.dumps(status)}\n".encode())
  out.flush()
  if pidfile:
    try:
      os.unlink(pidfile)
    except FileNotFoundError:
      pass
  return status


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--cmd", required=True)
  p.add_argument("--cwd", default="/workspace")
  p.add_argument("--timeout", type=float, required=True)
  p.add_argument("--grace", type=float, default=2.0)
  p.add_argument("--max_output", type=int, default=64 * 1024)
  p.add_argument("--pidfile", default="")
  p.add_argument("--rlimit_as", type=int, default=0)
  p.add_argument("--rlimit_fsize", type=int, default=0)
  p.add_argument("--rlimit_nproc", type=int, default=0)
  p.add_argument("--cgroup_pids", action="store_true",
                 help="Report forks refused at the cgroup pids limit (in a container).")
  run(p.parse_args())


if __name__ == "__main__":
  main()

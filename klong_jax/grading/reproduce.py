"""PaperBench's final check: the submission's reproduce.sh run in a sandbox (fresh for grading),
its files dated before the start so fresh checks can tell what the run wrote (`checks.fresh`)."""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path
from typing import Any

from klong_jax.grading.checks import stamp_command
from klong_jax.sandbox.base import (
    SUBMISSION,
    ExecResult,
    Sandbox,
    files_from_dir,
    make_sandbox,
)


def run_reproduce(sandbox: Any, submission_dir: str, timeout_s: float,
                  started_at: float | None = None) -> Any | None:
  """Runs `bash reproduce.sh` in the submission dir; None when the file is missing. With
  `started_at`, the files already there are first dated before it (checks.stamp_command)."""
  q = shlex.quote(submission_dir)
  probe = sandbox.exec(f"test -f {q}/reproduce.sh", 30.0)
  if probe.exit_code != 0:
    return None
  stamp = "" if started_at is None else stamp_command(started_at) + " "
  return sandbox.exec(f"cd {q} && {stamp}bash reproduce.sh 2>&1", timeout_s)



@dataclasses.dataclass
class ReproduceResult:
  """The PaperBench-style final check: reproduce.sh run in a fresh sandbox."""

  result: ExecResult
  log: str
  output_dir: str          # Host copy of the submission after reproduce.sh (with reproduce.log).
  # Unix time reproduce.sh started (fresh checks and judges compare file mtimes to it); None when
  # the submission had no reproduce.sh.
  started_at: float | None = None


def run_reproduce_in(sandbox: Sandbox, files: dict[str, bytes], timeout_s: float,
                     dest: str = SUBMISSION) -> tuple[ExecResult, float | None]:
  """Puts submission files into `sandbox` at dest and runs reproduce.sh there (log tee'd to
  reproduce.log); returns (result, unix start time or None without reproduce.sh). The files put
  in are dated before the start, so grading can tell what reproduce.sh wrote (checks `fresh`).
  The sandbox stays open for grading checks."""
  # The files go in first even without reproduce.sh: grading checks still inspect them.
  sandbox.put_files(files, dest=dest)
  if "reproduce.sh" not in files:
    return ExecResult(127, "reproduce.sh not found in submission", False, False, 0.0), None
  started = time.time()
  res = sandbox.exec(stamp_command(started)
                     + " bash reproduce.sh 2>&1 | tee reproduce.log; exit ${PIPESTATUS[0]}",
                     timeout_s=timeout_s, workdir=dest)
  return res, started


def reproduce(submission_dir: str, timeout_s: float, output_dir: str, backend: str = "docker",
              **limits: Any) -> ReproduceResult:
  """Copies a submission into a FRESH sandbox, runs its reproduce.sh, copies the result out."""
  files = files_from_dir(submission_dir)
  Path(output_dir).mkdir(parents=True, exist_ok=True)
  with make_sandbox(backend, **limits) as sb:
    res, started = run_reproduce_in(sb, files, timeout_s)
    sb.get_dir(SUBMISSION, output_dir)
  log_path = Path(output_dir) / "reproduce.log"
  if not log_path.exists():
    log_path.write_text(res.output)
  return ReproduceResult(res, res.output, output_dir, started)

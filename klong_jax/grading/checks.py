"""Programmatic rubric leaves, run inside a sandbox (JAX-free).

A leaf's `check` is one of:
  {"type": "file_exists", "path": P}
  {"type": "command", "cmd": C, "exit_code": 0, "timeout_s": 60}
  {"type": "regex", "pattern": R, "file": P | "cmd": C | "source": "reproduce_log"}
  {"type": "numeric", "expected": x, "atol": 1e-6, "rtol": 0.0,
   "file": P, "key": "a.b" (JSON path)  |  ("file": P | "cmd": C, "pattern": R with one group)}
  {"type": "reproduce_ok"}   (reproduce.sh exited 0 within its time limit)
Paths and commands are relative to the submission dir. The sandbox is anything with
`exec(cmd, timeout_s) -> ExecResult(exit_code, output, timed_out, truncated, duration_s)`.
A check that reads a file may set `"fresh": true`: the file must have been written by the
reproduce run (PaperBench's Result Analysis rule: only files whose mtime is at or after the
reproduce time count; grade.py makes it the default for Result Analysis leaves). Reproduce runs
stamp the submission's files `2 * FRESH_SLACK_S` before their start (`stamp_command`), so the
test is robust to coarse file-system clocks.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from typing import Any

CHECK_TYPES = ("file_exists", "command", "regex", "numeric", "reproduce_ok")
DEFAULT_TIMEOUT_S = 60.0
FRESH_SLACK_S = 1.0
_STALE_EXIT = 3  # Exit code of a fresh-guarded command whose file predates the reproduce run.


class CheckError(ValueError):
  """A malformed check spec; names the field to fix."""


def validate_check(check: Mapping[str, Any]) -> None:
  """Raises CheckError when a spec lacks what its type needs."""
  t = check.get("type")
  if t not in CHECK_TYPES:
    raise CheckError(f"check type {t!r} not in {CHECK_TYPES}")
  need = {"file_exists": ("path",), "command": ("cmd",), "regex": ("pattern",),
          "numeric": ("expected",)}.get(t, ())
  for k in need:
    if k not in check:
      raise CheckError(f"{t} check needs field {k!r}")
  if t == "regex" and not any(k in check for k in ("file", "cmd", "source")):
    raise CheckError("regex check needs one of 'file', 'cmd' or 'source': 'reproduce_log'")
  if t == "numeric" and not ("key" in check or "pattern" in check):
    raise CheckError("numeric check needs 'key' (JSON path in 'file') or 'pattern' (one group)")
  if t == "numeric" and "file" not in check and "cmd" not in check:
    raise CheckError("numeric check needs 'file' or 'cmd'")
  if "pattern" in check:
    try:
      re.compile(check["pattern"])
    except re.error as e:
      raise CheckError(f"{t} check pattern {check['pattern']!r} is not a regex ({e})") from None


def stamp_command(started_at: float) -> str:
  """Shell that dates every file under the cwd before `started_at` (run just before reproduce.sh),
  so the files reproduce.sh writes are the only ones `fresh` checks accept."""
  return (f"find . -exec touch -h -d @{started_at - 2 * FRESH_SLACK_S:.3f} {{}} + "
          "2>/dev/null;")


def _exec(sandbox: Any, submission_dir: str, cmd: str, timeout_s: float) -> Any:
  return sandbox.exec(f"cd {shlex.quote(submission_dir)} && {cmd}", timeout_s)


def _exec_fresh(sandbox: Any, submission_dir: str, path: str, fresh_since: float | None,
                cmd: str, timeout_s: float) -> tuple[Any, str | None]:
  """Runs `cmd` on `path`, first (with fresh_since) failing if the file predates the reproduce
  run; returns (result, why it is stale, or None)."""
  if fresh_since is None:
    return _exec(sandbox, submission_dir, cmd, timeout_s), None
  q = shlex.quote(path if path.startswith("/") else "./" + path)
  since = f"@{fresh_since - FRESH_SLACK_S:.3f}"
  res = _exec(sandbox, submission_dir,
              f"test -e {q} || exit 1; test -n \"$(find {q} -maxdepth 0 -newermt {since})\" "
              f"|| exit {_STALE_EXIT}; {cmd}", timeout_s)
  if res.exit_code == _STALE_EXIT:
    return res, f"{path} was not written by the reproduce run (its mtime predates reproduce.sh)"
  return res, None


def _text(check: Mapping[str, Any], sandbox: Any, submission_dir: str,
          reproduce_log: str | None, timeout_s: float, fresh_since: float | None
          ) -> tuple[str | None, str]:
  """The text a regex/numeric check reads, or (None, why it is unavailable)."""
  if check.get("source") == "reproduce_log":
    return (reproduce_log, "") if reproduce_log is not None else (None, "no reproduce log")
  if "file" in check:
    f = check["file"]
    res, stale = _exec_fresh(sandbox, submission_dir, f, fresh_since,
                             f"cat -- {shlex.quote(f)}", timeout_s)
    if stale:
      return None, stale
    if res.exit_code != 0:
      return None, f"cannot read {f!r} (exit {res.exit_code})"
    return res.output, ""
  res = _exec(sandbox, submission_dir, check["cmd"], timeout_s)
  if res.timed_out:
    return None, f"command timed out after {timeout_s}s"
  return res.output, ""


def _json_path(obj: Any, key: str) -> Any:
  for part in key.split("."):
    if isinstance(obj, list):
      obj = obj[int(part)]
    else:
      obj = obj[part]
  return obj


def run_check(check: Mapping[str, Any], sandbox: Any, submission_dir: str,
              reproduce: Any = None, *, fresh: bool = False,
              reproduce_started_at: float | None = None) -> tuple[float, str]:
  """Runs one check; returns (score in {0, 1}, explanation). Sandbox errors propagate.

  `fresh`: the file the check reads must postdate `reproduce_started_at`; with no start time
  (reproduce.sh never ran) a fresh check scores 0, as PaperBench scores Result Analysis when
  reproduce.sh touched no files.
  """
  validate_check(check)
  t = check["type"]
  timeout_s = float(check.get("timeout_s", DEFAULT_TIMEOUT_S))
  reads = check.get("path") if t == "file_exists" else check.get("file")
  fresh_since = None
  if fresh and reads is not None:
    if reproduce_started_at is None:
      return 0.0, f"reproduce.sh did not run, so {reads} is not one of its outputs"
    fresh_since = reproduce_started_at
  if t == "reproduce_ok":
    if reproduce is None:
      return 0.0, "reproduce.sh was not run (missing or no reproduce result)"
    ok = reproduce.exit_code == 0 and not reproduce.timed_out
    return float(ok), (f"reproduce.sh exit code {reproduce.exit_code}"
                       + (", timed out" if reproduce.timed_out else ""))
  if t == "file_exists":
    res, stale = _exec_fresh(sandbox, submission_dir, check["path"], fresh_since,
                             f"test -e {shlex.quote(check['path'])}", timeout_s)
    if stale:
      return 0.0, stale
    ok = res.exit_code == 0
    return float(ok), f"{check['path']} {'exists' if ok else 'does not exist'}"
  if t == "command":
    res = _exec(sandbox, submission_dir, check["cmd"], timeout_s)
    want = int(check.get("exit_code", 0))
    ok = res.exit_code == want and not res.timed_out
    tail = res.output[-300:].strip()
    return float(ok), (f"`{check['cmd']}` exited {res.exit_code} (want {want})"
                       + (", timed out" if res.timed_out else "") + (f": {tail}" if tail else ""))
  reproduce_log = None if reproduce is None else reproduce.output
  text, why = _text(check, sandbox, submission_dir, reproduce_log, timeout_s, fresh_since)
  if text is None:
    return 0.0, why
  if t == "regex":
    ok = re.search(check["pattern"], text, re.MULTILINE) is not None
    return float(ok), f"pattern {check['pattern']!r} {'found' if ok else 'not found'}"
  # numeric
  try:
    if "key" in check:
      value = float(_json_path(json.loads(text), check["key"]))
    else:
      m = re.search(check["pattern"], text, re.MULTILINE)
      if m is None:
        return 0.0, f"pattern {check['pattern']!r} not found"
      value = float(m.group(1))
  except (ValueError, KeyError, IndexError, TypeError) as e:
    return 0.0, f"could not read value {check.get('key', check.get('pattern'))!r}: {e!r}"
  expected = float(check["expected"])
  atol, rtol = float(check.get("atol", 1e-6)), float(check.get("rtol", 0.0))
  ok = math.isfinite(value) and abs(value - expected) <= atol + rtol * abs(expected)
  return float(ok), f"value {value:g} vs expected {expected:g} (atol {atol:g}, rtol {rtol:g})"

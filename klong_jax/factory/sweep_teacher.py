"""The scripted teacher's policy for long-horizon sweep tasks (tasks/long_suite.py).

It decides each action from what the context window shows, as the student must: the latest
harness output (`run K: ...`, `k/N runs done`, `table: ...`, or the usage line after a bad
command) says what comes next. It runs setting 1, then one setting per call, then writes
reproduce.sh, then submits. Mistakes (drawn per call, see ScriptedTeacher): crash (a malformed
run command; the usage line is seen in the next output and the run repeated), skip_run (jumps a
setting), stop_early (submits half way), no_reproduce (submits without reproduce.sh).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from klong_jax.tasks.families import FAMILY_BY_FN, Family

SWEEP_MARK = re.compile(r"implements `(\w+)`.*?K = 1\.\.(\d+)", re.DOTALL)
_RUN = re.compile(r"^run (\d+): ", re.MULTILINE)
_TABLE = re.compile(r"^table: (\d+)/(\d+) runs", re.MULTILINE)
_USAGE = re.compile(r"^usage: python3 run\.py", re.MULTILINE)
REPRODUCE = "printf 'python3 run.py table\\n' > reproduce.sh && bash reproduce.sh"


def _text(m: dict[str, Any]) -> str:
  c = m.get("content")
  if isinstance(c, list):
    return "".join(p.get("text", "") for p in c if isinstance(p, dict))
  return c or ""


def find_sweep(messages: Sequence[dict[str, Any]]) -> tuple[Family, int] | None:
  """(family, number of settings) if the conversation's paper is a sweep task."""
  for m in messages:
    hit = SWEEP_MARK.search(_text(m))
    if hit and hit.group(1) in FAMILY_BY_FN:
      return FAMILY_BY_FN[hit.group(1)], int(hit.group(2))
  return None


def progress(messages: Sequence[dict[str, Any]]) -> tuple[str, int]:
  """What the harness outputs in view say: (state, last run K logged).

  state: "start" (nothing run yet), "ran", "crashed" (the latest output is an error; K is the
  last run before it, 0 if none is in view) or "table".
  """
  state = ""
  for m in reversed(messages):
    if m.get("role") != "tool":
      continue
    text = _text(m)
    if _TABLE.search(text) and not state:
      return "table", 0
    runs = _RUN.findall(text)
    if runs:
      return state or "ran", int(runs[-1])
    if not state and (_USAGE.search(text) or "Traceback" in text or "Error" in text):
      state = "crashed"
  return state or "start", 0


def run_script(sub: str, k: int) -> str:
  """The bash that runs setting `k` through the harness."""
  return f"cd {shlex.quote(sub)} && python3 run.py {k}"


def bad_run_script(sub: str, k: int) -> str:
  """A malformed run command (the `crash` mistake): the setting number is mistyped."""
  return f"cd {shlex.quote(sub)} && python3 run.py K={k}"


def reproduce_script(sub: str) -> str:
  """The bash that writes reproduce.sh (rebuild the table from the logged runs) and runs it."""
  return f"cd {shlex.quote(sub)} && {REPRODUCE}"


def sweep_action(family: Family, n: int, messages: Sequence[dict[str, Any]], sub: str,
                 mistakes: set[str]) -> tuple[str, str | None]:
  """(content, bash script) of the next action, or (content, None) to submit.

  `mistakes` is the draw for this call (ScriptedTeacher.mistakes): crash and skip_run apply to
  one run, stop_early at the half-way run, no_reproduce at the end.
  """
  del family  # The harness knows the method; every sweep is driven the same way.
  state, k = progress(messages)
  if state == "table":
    return "The table is reproduced. Submitting.", None
  if state == "crashed":
    return f"That command failed; I will run setting {k + 1} again.", run_script(sub, k + 1)
  if "stop_early" in mistakes and k == n // 2:
    return "Half the runs are logged; that is enough. Submitting.", None
  if k < n:
    nxt = k + 2 if "skip_run" in mistakes and k + 2 <= n else k + 1
    script = bad_run_script(sub, nxt) if "crash" in mistakes else run_script(sub, nxt)
    return (f"I will run the sweep: setting {nxt}." if k == 0 else f"Run {nxt}."), script
  if "no_reproduce" in mistakes:
    return "All runs are logged. Submitting.", None
  return "All runs are logged; reproduce.sh rebuilds the table.", reproduce_script(sub)

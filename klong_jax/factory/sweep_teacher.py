"""The scripted teacher's policy for long-horizon sweep tasks (tasks/long_suite.py).

It decides each action from what the context window shows, as the student must: the latest
harness output (`run K: ...`, `N/M runs done`, `table: ...`) says what comes next. First it writes
the method and runs setting 1, then one setting per call, then reproduce.sh, then submits.
Mistakes (per episode draw, see ScriptedTeacher): wrong_fn / wrong_key / crash in the code (a crash
is seen in the next output and repaired), skip_run (jumps a setting), stop_early (submits half
way), no_reproduce (submits without reproduce.sh).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from klong_jax.tasks.families import FAMILY_BY_FN, SOLUTION_FILE, Family

SWEEP_MARK = re.compile(r"Implement `(\w+)` in `solution\.py`.*?K = 1\.\.(\d+)", re.DOTALL)
_RUN = re.compile(r"^run (\d+): ", re.MULTILINE)
_TABLE = re.compile(r"^table: (\d+)/(\d+) runs", re.MULTILINE)
_DONE = re.compile(r"^(\d+)/(\d+) runs done", re.MULTILINE)


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
  """What the latest harness output in view says: ("start"|"crashed"|"ran"|"table", run K)."""
  for m in reversed(messages):
    if m.get("role") != "tool":
      continue
    text = _text(m)
    if _TABLE.search(text):
      return "table", 0
    runs = _RUN.findall(text)
    if runs:
      return "ran", int(runs[-1])
    if "Traceback" in text or "Error" in text:
      return "crashed", 0
  return "start", 0


def solution_code(family: Family, mistakes: set[str]) -> str:
  """The method as the teacher writes it (with the episode's code mistakes)."""
  code = family.code
  if "wrong_fn" in mistakes:
    code = code.replace(f"def {family.fn}(", f"def {family.fn}_impl(", 1)
    code += f"\n{family.fn} = {family.fn}_impl"
  if "wrong_key" in mistakes:
    k = family.metrics[0]
    code = code.replace(f"'{k}':", f"'{k.upper()}':", 1)
  if "crash" in mistakes:
    code = code.replace("return {", "return {{", 1)
  return code + "\n"


def method_script(family: Family, sub: str, mistakes: set[str] = frozenset()) -> str:
  """The bash that writes the method into `sub` and runs setting 1."""
  code = solution_code(family, mistakes)
  return f"cd {shlex.quote(sub)}\ncat > {SOLUTION_FILE} <<'EOF'\n{code}EOF\npython3 run.py 1"


def run_script(sub: str, k: int) -> str:
  """The bash that runs setting `k` through the harness."""
  return f"cd {shlex.quote(sub)} && python3 run.py {k}"


def sweep_action(family: Family, n: int, messages: Sequence[dict[str, Any]], sub: str,
                 mistakes: set[str]) -> tuple[str, str | None]:
  """(content, bash script) of the next action, or (content, None) to submit.

  `mistakes` is the draw for this call (ScriptedTeacher.mistakes): code mistakes apply when the
  method is written, skip_run to one run, stop_early at the half-way run, no_reproduce at the end.
  """
  state, k = progress(messages)
  if state in ("start", "crashed"):
    what = "I will implement" if state == "start" else "The run failed; I will fix"
    return (f"{what} `{family.fn}` and run setting 1.",
            method_script(family, sub, mistakes if state == "start" else mistakes - {"crash"}))
  if state == "table":
    return "The table is reproduced. Submitting.", None
  if "stop_early" in mistakes and k == n // 2:  # Mistakes are drawn per call: once per episode.
    return "Half the runs are logged; that is enough. Submitting.", None
  if k < n:
    nxt = k + 2 if "skip_run" in mistakes and k + 2 <= n else k + 1
    return f"Run {nxt}.", run_script(sub, nxt)
  if "no_reproduce" in mistakes:
    return "All runs are logged. Submitting.", None
  return ("All runs are logged; reproduce.sh rebuilds the table.",
          f"cd {shlex.quote(sub)} && printf 'python3 run.py table\\n' > reproduce.sh && "
          "bash reproduce.sh")

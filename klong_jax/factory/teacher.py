"""A rule-based teacher that solves the bundled mini-paper tasks through the agent's tools.

`ScriptedTeacher(skill, seed)` is a `policy(messages, tools) -> assistant message` (OpenAI shape
with tool_calls) that reads the paper (from the conversation, or by calling a read tool first),
writes `solution.py` + `reproduce.sh` from the family template with the paper's parameters, runs
it, and submits. With skill < 1 it makes task-relevant mistakes (wrong parameter, wrong function
name, missing reproduce.sh, wrong metric key, crashing code), so graded scores spread out;
`mistake_rates` sets the rate of chosen kinds (e.g. raise the partial-credit ones that
distillation keeps, so SFT imitates them and RL has something to unlearn; off in the demo).
With `reasoning=True` it is a thinking teacher: each turn also carries `reasoning_content` (why
it acts), as a reasoning model served with a reasoning parser answers, so distillation keeps it.
Serve it with `klong_jax.agent.policy_server.serve_in_thread(teacher)`.
"""

from __future__ import annotations

import ast
import json
import random
import re
import shlex
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax import config_util
from klong_jax.factory import sweep_teacher
from klong_jax.tasks.families import (
    FAMILY_BY_FN,
    METRICS_FILE,
    SOLUTION_FILE,
    Family,
    literal_call,
    solution_call,
)

# Mini-papers use all but the last two, which only apply to long-horizon sweeps; sweeps use
# crash, skip_run, stop_early and no_reproduce (factory/sweep_teacher.py: the method is released).
MISTAKES = ("wrong_param", "wrong_fn", "no_reproduce", "wrong_key", "crash", "skip_run",
            "stop_early")
SWEEP_ONLY = ("skip_run", "stop_early")
DEFAULT_SUBMISSION_DIR = "/workspace/submission"
_IMPLEMENT = re.compile(r"Implement `(\w+)\(")
_PARAM = re.compile(r"^- `(\w+)` = (.+)$", re.MULTILINE)
_PAPER_PATH = re.compile(r"(/[\w./-]*paper\.md)")
_SUBMISSION = re.compile(r"(/[\w./-]*submission)\b")


def _text(m: dict[str, Any]) -> str:
  c = m.get("content")
  if isinstance(c, list):
    return "".join(p.get("text", "") for p in c if isinstance(p, dict))
  return c or ""


def find_paper(messages: Sequence[dict[str, Any]]) -> tuple[Family, dict[str, Any]] | None:
  """The task family and its parameters, read from the first message holding the paper."""
  for m in messages:
    text = _text(m)
    fm = _IMPLEMENT.search(text)
    if not fm or fm.group(1) not in FAMILY_BY_FN:
      continue
    # Tool output from read tools may prefix lines with numbers ("12: - `a` = 3"); strip them.
    clean = re.sub(r"^\s*\d+: ", "", text, flags=re.MULTILINE)
    params = {}
    for k, v in _PARAM.findall(clean):
      try:
        params[k] = ast.literal_eval(v.strip())
      except (ValueError, SyntaxError):
        continue
    if params:
      return FAMILY_BY_FN[fm.group(1)], params
  return None


def parse_rates(text: str) -> dict[str, float]:
  """'wrong_fn=0.3,wrong_key=0.3' -> {kind: rate}; '' -> {} (kinds checked by the teacher)."""
  return config_util.parse_floats(text, "teacher mistake rates", "wrong_fn=0.3,wrong_key=0.3",
                                  "KIND=RATE")


def _tool(tools: Sequence[dict[str, Any]] | None, *names: str) -> tuple[str, str] | None:
  """(tool name, first required parameter) of the first tool whose name is in `names`."""
  for want in names:
    for t in tools or []:
      f = t.get("function", t)
      if f.get("name") == want:
        params = f.get("parameters") or {}
        req = params.get("required") or list((params.get("properties") or {}).keys())
        return f["name"], (req[0] if req else "cmd")
  return None


def _perturb(params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
  out = dict(params)
  keys = [k for k, v in out.items() if isinstance(v, (int, float, list))]
  if not keys:
    return out
  k = rng.choice(keys)
  v = out[k]
  if isinstance(v, list):
    out[k] = v[:-1] if len(v) > 2 else v + v[-1:]
  elif isinstance(v, int):
    out[k] = v + rng.choice((1, 2, 3))
  else:
    out[k] = round(v * rng.choice((0.8, 1.25)), 6)
  return out


class _PythonShell(tuple):
  """(name, arg) of a python tool used as a shell: the script runs via subprocess + bash."""

  def __new__(cls, name: str, arg: str):
    return super().__new__(cls, (name, arg))

  @staticmethod
  def wrap(script: str) -> str:
    return ("import subprocess\nr = subprocess.run(" + repr(script) + ", shell=True, "
            "executable='/bin/bash', capture_output=True, text=True)\nprint(r.stdout + r.stderr)")


class ScriptedTeacher:
  """Rule-based policy for the bundled suite; `skill` in [0, 1] sets the mistake rate.

  Each kind in MISTAKES fires with probability (1 - skill) / 2 per episode unless
  `mistake_rates` names it (e.g. {"wrong_fn": 0.3}).
  """

  def __init__(self, skill: float = 1.0, seed: int = 0,
               mistake_rates: Mapping[str, float] | None = None, reasoning: bool = False):
    if not 0.0 <= skill <= 1.0:
      raise ValueError(f"skill must be in [0, 1], got {skill}")
    self.skill, self.reasoning = skill, reasoning
    self.rates = {m: (1.0 - skill) / 2 for m in MISTAKES}
    for kind, rate in (mistake_rates or {}).items():
      if kind not in self.rates:
        raise ValueError(f"unknown teacher mistake {kind!r}; choose from {', '.join(MISTAKES)}")
      if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mistake rate of {kind!r} must be in [0, 1], got {rate}")
      self.rates[kind] = float(rate)
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._n = 0

  def _shell(self, tool: tuple[str, str], script: str) -> dict[str, Any]:
    if isinstance(tool, _PythonShell):
      script = tool.wrap(script)
    return self._call(tool[0], tool[1], script)

  def _call(self, name: str, arg: str, value: str) -> dict[str, Any]:
    with self._lock:
      self._n += 1
      cid = f"call_{self._n}"
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps({arg: value})}}

  def _message(self, content: str, call: dict[str, Any] | None,
               why: str = "") -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if self.reasoning and why:
      msg["reasoning_content"] = why
    if call is not None:
      msg["tool_calls"] = [call]
    return msg

  def mistakes(self) -> set[str]:
    """Draws this episode's mistakes: each kind fires independently at its rate."""
    with self._lock:
      return {m for m in MISTAKES if self._rng.random() < self.rates[m]}

  def solution_script(self, family: Family, params: dict[str, Any], submission_dir: str,
                      mistakes: set[str] = frozenset()) -> str:
    """The bash script that writes and runs the solution (with the given mistakes)."""
    code = family.code
    if "wrong_fn" in mistakes:
      code = code.replace(f"def {family.fn}(", f"def {family.fn}_impl(", 1)
      code += f"\n{family.fn} = {family.fn}_impl"
    if "wrong_key" in mistakes:
      k = family.metrics[0]
      code = code.replace(f"'{k}':", f"'{k.upper()}':", 1)
    call = solution_call(family)
    if "wrong_param" in mistakes:  # Retypes the paper's constants instead, one of them wrong.
      with self._lock:
        call = literal_call(family, _perturb(params, self._rng))
    run = f"json.dump({call}, open('{METRICS_FILE}', 'w'))"
    if "crash" in mistakes:
      run = run[:-1]
    src = f"import json, os\n{code}\nos.makedirs('results', exist_ok=True)\n{run}\n"
    lines = [f"mkdir -p {shlex.quote(submission_dir)} && cd {shlex.quote(submission_dir)}",
             f"cat > {SOLUTION_FILE} <<'EOF'\n{src}EOF"]
    if "no_reproduce" in mistakes:
      lines.append(f"python3 {SOLUTION_FILE}")
    else:
      lines.append(f"printf 'python3 {SOLUTION_FILE}\\n' > reproduce.sh")
      lines.append("bash reproduce.sh")
    lines.append(f"cat {METRICS_FILE}")
    return "\n".join(lines)

  def __call__(self, messages: Sequence[dict[str, Any]],
               tools: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One assistant turn: read the paper, then solve, then submit."""
    bash = _tool(tools, "bash", "shell")
    if bash is None and (py := _tool(tools, "python", "python-tool")) is not None:
      bash = _PythonShell(*py)
    submit = _tool(tools, "submit")
    all_text = "\n".join(_text(m) for m in messages)
    sweep = sweep_teacher.find_sweep(messages)
    if sweep is not None and bash is not None:
      m = _SUBMISSION.search(all_text)
      sub = m.group(1) if m else DEFAULT_SUBMISSION_DIR
      content, script = sweep_teacher.sweep_action(*sweep, messages, sub, self.mistakes())
      why = (f"This is a long-horizon sweep; {len(messages)} messages so far. Next: "
             f"{content[:1].lower()}{content[1:]}")
      if script is not None:
        return self._message(content, self._shell(bash, script), why)
      if submit is not None:
        return self._message(content, self._call(*submit, content), why)
      return self._message(content + " Done.", None, why)
    acted = [c for m in messages if m.get("role") == "assistant"
             for c in (m.get("tool_calls") or [])]
    solved = any(SOLUTION_FILE in c.get("function", {}).get("arguments", "") for c in acted)
    found = find_paper(messages)
    if solved or (found is None and acted) or bash is None:
      why = ("The solution is written and reproduce.sh was run." if solved else
             "I have no shell or python tool to work with." if bash is None else
             "I could not find the task parameters in the paper.")
      think = f"{why} Nothing more I can do here, so I end the task."
      if submit is None:
        return self._message(why + " Done.", None, think)
      return self._message(why + " Submitting.", self._call(*submit, why), think)
    if found is None:
      m = _PAPER_PATH.search(all_text)
      path = m.group(1) if m else "paper.md"
      return self._message("I will read the paper first.",
                           self._shell(bash, f"cat {shlex.quote(path)}"),
                           f"The task parameters are not in the conversation yet; {path} "
                           "has them, so I read it before writing any code.")
    family, params = found
    m = _SUBMISSION.search(all_text)
    sub = m.group(1) if m else DEFAULT_SUBMISSION_DIR
    script = self.solution_script(family, params, sub, self.mistakes())
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return self._message(f"The paper asks for `{family.fn}`; I will implement and run it.",
                         self._shell(bash, script),
                         f"The paper defines `{family.fn}` with {shown}. I write {SOLUTION_FILE} "
                         f"and reproduce.sh in {sub}, run it and check {METRICS_FILE}.")

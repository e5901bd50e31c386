"""Agent tools after PaperBench's basic agent: bash, python, read_file_chunk, search_file, submit.

`REGISTRY` maps each tool's name to a `Tool(name, schema, run)`; `TOOLS` is its list of OpenAI
function schemas (what the scaffold offers and the chat template renders), and `execute_tool`
dispatches one call through it. A call always returns text for the model (bad arguments become an
error message, never an exception), except sandbox infrastructure failures, which propagate as
SandboxError for the worker to retry.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import uuid
from collections.abc import Callable
from typing import Any

from klong_jax.sandbox.base import ExecResult, Sandbox


def function_schema(name: str, desc: str, props: dict[str, Any],
                    required: list[str]) -> dict[str, Any]:
  """An OpenAI function-tool schema taking an object with `props`."""
  return {"type": "function", "function": {
      "name": name, "description": desc,
      "parameters": {"type": "object", "properties": props, "required": required,
                     "additionalProperties": False}}}


@dataclasses.dataclass
class ToolOutcome:
  """The text returned to the model, and whether the call ended the episode or was malformed."""

  content: str
  submitted: bool = False
  error: bool = False
  timed_out: bool = False
  cpu_s: float | None = None  # CPU seconds the sandbox spent on it (None: not measured).


# Shared head of the in-sandbox file scripts: refuses non-regular files and streams lines in
# blocks, keeping at most `keep` bytes of each, so a huge file or line never fills memory.
_LINES = r"""
import os, stat, sys

MAX_SHOW = 2000  # Characters of one line shown to the model.

def open_regular(path):
    try:
        st = os.stat(path)
    except OSError as e:
        sys.exit(f"cannot read {path}: {e.strerror}")
    if stat.S_ISDIR(st.st_mode):
        sys.exit(f"{path} is a directory; list it with the bash tool (ls {path})")
    if not stat.S_ISREG(st.st_mode):
        sys.exit(f"{path} is not a regular file (a device, pipe or socket); only regular files "
                 "can be read with this tool")
    try:
        return open(path, "rb")
    except OSError as e:
        sys.exit(f"cannot read {path}: {e.strerror}")

def lines(f, keep, stop=None):
    # Yields (line number, first `keep` bytes of the line, its full length in bytes); past line
    # `stop` it only counts the rest and yields (number of the last line, None, 0) once.
    num, part, size = 1, bytearray(), 0
    block, pos = f.read(1 << 20), 0
    while block:
        i = block.find(b"\n", pos)
        seg = block[pos:] if i < 0 else block[pos:i]
        if len(part) < keep:
            part += seg[:keep - len(part)]
        size += len(seg)
        if i < 0:
            block, pos = f.read(1 << 20), 0
            continue
        yield num, bytes(part), size
        num, part, size, pos = num + 1, bytearray(), 0, i + 1
        if stop is not None and num > stop:
            count, last = block.count(b"\n", pos), block[pos:][-1:] or b"\n"
            while block := f.read(1 << 20):
                count += block.count(b"\n")
                last = block[-1:]
            yield num - 1 + count + (last != b"\n"), None, 0
            return
    if size:
        yield num, bytes(part), size

def show(part, size):
    text = part.decode("utf-8", "replace").rstrip("\r")
    if size > len(part) or len(text) > MAX_SHOW:
        return text[:MAX_SHOW] + f" [... line cut: {size} bytes]"
    return text
"""

_READ_CHUNK = _LINES + r"""
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shown, total = [], 0
with open_regular(path) as f:
    for num, part, size in lines(f, 4 * MAX_SHOW + 4, stop=start + n - 1):
        total = num
        if part is not None and start <= num < start + n:
            shown.append(f"{num}: {show(part, size)}")
if start > total and total:
    sys.exit(f"start_line {start} is past the end of the file ({total} lines)")
end = min(start + n - 1, total)
print(f"File has {total} total lines. Showing lines {start} to {end}.\n")
if shown:
    print("\n".join(shown))
"""

_SEARCH = _LINES + r"""
from collections import deque
path, query, ctx, per, page = sys.argv[1], sys.argv[2].lower(), *map(int, sys.argv[3:6])
first = (page - 1) * per
before, blocks, hits = deque(maxlen=ctx), [], 0  # blocks: [hit number, lines, lines still due]
with open_regular(path) as f:
    for num, part, size in lines(f, 1 << 20):
        text = show(part, size)
        for b in blocks:
            if b[2] > 0:
                b[1].append("    " + f"{num}: {text}")
                b[2] -= 1
        if query in part.decode("utf-8", "replace").lower():
            hits += 1
            if first < hits <= first + per:
                blocks.append([hits, [*before, ">>> " + f"{num}: {text}"], ctx])
        before.append("    " + f"{num}: {text}")
if not hits:
    print(f"No matches for {sys.argv[2]!r} in {path}.")
    sys.exit(0)
pages = (hits + per - 1) // per
if page > pages:
    sys.exit(f"page {page} does not exist: {hits} matches make {pages} page(s)")
for k, block, _ in blocks:
    print(f"[Match {k} of {hits}]")
    print("\n".join(block))
    print()
print(f"Page {page} of {pages}.")
"""


def _int_arg(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
  val = args.get(key, default)
  if isinstance(val, bool) or not isinstance(val, (int, float, str)):
    raise ValueError(f"argument {key!r} must be an integer, got {val!r}")
  try:
    val = int(val)
  except ValueError:
    raise ValueError(f"argument {key!r} must be an integer, got {val!r}") from None
  return max(lo, min(hi, val))


def _str_arg(args: dict[str, Any], key: str) -> str:
  if key not in args:
    raise ValueError(f"missing required argument {key!r}")
  if not isinstance(args[key], str):
    raise ValueError(f"argument {key!r} must be a string, got {type(args[key]).__name__}")
  return args[key]


def parse_arguments(raw: Any) -> dict[str, Any]:
  """Parses a tool call's JSON arguments; raises ValueError with a message for the model."""
  if isinstance(raw, dict):
    return raw
  if raw is None or raw == "":
    return {}
  try:
    val = json.loads(raw)
  except (TypeError, json.JSONDecodeError) as e:
    raise ValueError(f"arguments are not valid JSON ({e}); send a JSON object") from None
  if not isinstance(val, dict):
    raise ValueError(f"arguments must be a JSON object, got {type(val).__name__}")
  return val


def malformed_call_message(error: str) -> str:
  """The observation for a turn whose tool-call text the server could not parse: what was
  wrong and the expected form (the server's error names both); nothing was run."""
  return (f"Error: your tool call could not be parsed, so no tool was run. {error.strip()}. "
          "Write the call again in that form.")


def _format(res: ExecResult) -> str:
  text = res.output.rstrip("\n")
  notes = []
  if res.timed_out:
    notes.append(f"[command timed out after {res.duration_s:.0f}s and was killed]")
  elif res.exit_code != 0:
    notes.append(f"[exit code {res.exit_code}]")
  if getattr(res, "pids_limited", False):
    notes.append(f"[process limit reached: {res.pids_max or '?'} pids; a fork failed, so part of "
                 "the command may not have run; stop background jobs or use fewer processes]")
  return "\n".join([text, *notes]).strip() or "(no output)"


def _cpu(res: ExecResult) -> float | None:
  """The command's CPU seconds (None from a sandbox that does not measure them)."""
  return getattr(res, "cpu_s", None)



# --- The tools: each is a function (sandbox, args, timeout_s, workdir) -> ToolOutcome. ---------


def _bash(sandbox: Sandbox, args: dict[str, Any], timeout_s: float, workdir: str) -> ToolOutcome:
  res = sandbox.exec(_str_arg(args, "cmd"), timeout_s=timeout_s, workdir=workdir)
  return ToolOutcome(_format(res), timed_out=res.timed_out, cpu_s=_cpu(res))


def _python(sandbox: Sandbox, args: dict[str, Any], timeout_s: float,
            workdir: str) -> ToolOutcome:
  code = _str_arg(args, "code")
  delim = "KLONG_PY_" + uuid.uuid4().hex
  cmd = (f"d=$(mktemp -d) && cat > \"$d/code.py\" <<'{delim}'\n{code}\n{delim}\n"
         "python3 \"$d/code.py\"; rc=$?; rm -rf \"$d\"; exit $rc")
  res = sandbox.exec(cmd, timeout_s=timeout_s, workdir=workdir)
  return ToolOutcome(_format(res), timed_out=res.timed_out, cpu_s=_cpu(res))


def _read_file_chunk(sandbox: Sandbox, args: dict[str, Any], timeout_s: float,
                     workdir: str) -> ToolOutcome:
  path = _str_arg(args, "file")
  start = _int_arg(args, "start_line", 1, 1, 1 << 30)
  n = _int_arg(args, "max_lines", 50, 1, 50)
  cmd = " ".join(["python3", "-c", shlex.quote(_READ_CHUNK), shlex.quote(path), str(start),
                  str(n)])
  res = sandbox.exec(cmd, timeout_s=min(timeout_s, 60), workdir=workdir)
  return ToolOutcome(_format(res), error=res.exit_code != 0, cpu_s=_cpu(res))


def _search_file(sandbox: Sandbox, args: dict[str, Any], timeout_s: float,
                 workdir: str) -> ToolOutcome:
  path, query = _str_arg(args, "file"), _str_arg(args, "query")
  if not query:
    raise ValueError("argument 'query' must not be empty")
  ctx = _int_arg(args, "context_lines", 2, 0, 20)
  per = _int_arg(args, "max_matches", 5, 1, 50)
  page = _int_arg(args, "page", 1, 1, 1 << 20)
  cmd = " ".join(["python3", "-c", shlex.quote(_SEARCH), shlex.quote(path), shlex.quote(query),
                  str(ctx), str(per), str(page)])
  res = sandbox.exec(cmd, timeout_s=min(timeout_s, 60), workdir=workdir)
  return ToolOutcome(_format(res), error=res.exit_code != 0, cpu_s=_cpu(res))


def _submit(sandbox: Sandbox, args: dict[str, Any], timeout_s: float,
            workdir: str) -> ToolOutcome:
  del sandbox, timeout_s, workdir
  msg = args.get("end_message", "")
  return ToolOutcome(f"Submitted. {msg}".strip(), submitted=True)


def _offline(sandbox: Sandbox, args: dict[str, Any], timeout_s: float,
             workdir: str) -> ToolOutcome:
  del sandbox, args, timeout_s, workdir
  return ToolOutcome("Error: web browsing is not available in this offline sandbox.", error=True)


# --- The registry. ---------------------------------------------------------------------------

ToolRun = Callable[[Sandbox, dict[str, Any], float, str], ToolOutcome]


@dataclasses.dataclass(frozen=True)
class Tool:
  """One agent tool: its OpenAI function schema and how to run a call of it.

  `run(sandbox, args, timeout_s, workdir)` gets the parsed arguments and returns the model's
  text; a ValueError it raises becomes an error message for the model. `schema=None` dispatches
  the tool without offering it to the model; `aliases` are other names that dispatch to it.
  """

  name: str
  schema: dict[str, Any] | None
  run: ToolRun
  aliases: tuple[str, ...] = ()

  def __post_init__(self) -> None:
    if self.schema is not None and self.schema["function"]["name"] != self.name:
      raise ValueError(f"tool {self.name!r} has a schema named "
                       f"{self.schema['function']['name']!r}")


class ToolRegistry:
  """Tools by name (and alias); `schemas` is the list offered to the model, kept in place."""

  def __init__(self, tools: list[Tool] | tuple[Tool, ...] = ()) -> None:
    self._tools: dict[str, Tool] = {}
    self._by_name: dict[str, Tool] = {}
    self.schemas: list[dict[str, Any]] = []
    for t in tools:
      self.register(t)

  def register(self, tool: Tool) -> Tool:
    names = (tool.name, *tool.aliases)
    taken = [n for n in names if n in self._by_name]
    if taken:
      raise ValueError(f"tool name(s) already registered: {', '.join(taken)}")
    self._tools[tool.name] = tool
    for n in names:
      self._by_name[n] = tool
    if tool.schema is not None:
      self.schemas.append(tool.schema)
    return tool

  def unregister(self, name: str) -> None:
    tool = self._tools.pop(name)
    for n in (tool.name, *tool.aliases):
      del self._by_name[n]
    if tool.schema is not None:
      self.schemas.remove(tool.schema)

  def get(self, name: str) -> Tool | None:
    return self._by_name.get(name)

  def names(self) -> tuple[str, ...]:
    """Names of the tools offered to the model, in schema order."""
    return tuple(s["function"]["name"] for s in self.schemas)

  def execute(self, sandbox: Sandbox, name: str, raw_args: Any, timeout_s: float,
              workdir: str = "/workspace") -> ToolOutcome:
    """Runs one tool call; malformed calls come back as error text for the model."""
    try:
      args = parse_arguments(raw_args)
      tool = self.get(name)
      if tool is None:
        raise ValueError(f"unknown tool {name!r}; available tools: {', '.join(self.names())}")
      return tool.run(sandbox, args, timeout_s, workdir)
    except ValueError as e:
      return ToolOutcome(f"Error executing tool {name!r}: {e}", error=True)


OFFLINE_TOOLS = ("web_search", "web_browser", "browse", "web_search_preview")

# The agent's tools: adding one is one entry here (or `REGISTRY.register(Tool(...))` at run time).
REGISTRY = ToolRegistry([
    Tool("bash", function_schema(
        "bash", "Run a bash command in the sandbox; returns its combined stdout/stderr.",
        {"cmd": {"type": "string", "description": "The bash command to run."}}, ["cmd"]), _bash),
    Tool("python", function_schema(
        "python", "Run a Python 3 program in the sandbox; returns its output.",
        {"code": {"type": "string", "description": "The Python code to run."}}, ["code"]),
        _python, aliases=("python-tool",)),
    Tool("read_file_chunk", function_schema(
        "read_file_chunk", "Read up to 50 lines of a file, numbered, starting at start_line.",
        {"file": {"type": "string"}, "start_line": {"type": "integer", "default": 1},
         "max_lines": {"type": "integer", "default": 50}}, ["file"]), _read_file_chunk),
    Tool("search_file", function_schema(
        "search_file", "Case-insensitive search of a file; matches with context, paginated.",
        {"file": {"type": "string"}, "query": {"type": "string"},
         "context_lines": {"type": "integer", "default": 2},
         "max_matches": {"type": "integer", "default": 5},
         "page": {"type": "integer", "default": 1}}, ["file", "query"]), _search_file),
    Tool("submit", function_schema(
        "submit", "End the task; your submission is the repository in the submission folder.",
        {"end_message": {"type": "string", "description": "A final summary of your work."}},
        ["end_message"]), _submit, aliases=("end_task",)),
    Tool(OFFLINE_TOOLS[0], None, _offline, aliases=OFFLINE_TOOLS[1:]),
])
# The schemas offered to the model: the registry's own list, so a registered tool appears here.
TOOLS: list[dict[str, Any]] = REGISTRY.schemas


def execute_tool(sandbox: Sandbox, name: str, raw_args: Any, timeout_s: float,
                 workdir: str = "/workspace") -> ToolOutcome:
  """Runs one tool call with the default registry (see ToolRegistry.execute)."""
  return REGISTRY.execute(sandbox, name, raw_args, timeout_s, workdir)

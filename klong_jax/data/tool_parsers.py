"""Generated assistant text -> OpenAI message parts, one parser per chat-format family (no JAX).

Families: "klong" (this repo's `<|tool_call|>{json}<|/tool_call|>`, parsed by data/chat.py),
"glm45" (`<tool_call>NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs, a value
typed by the tool's JSON schema) and "qwen3" (`<tool_call>\\n{"name", "arguments"}\\n</tool_call>`).
Each splits reasoning from a leading `<think>...</think>` block (or from the start of the text when
the prompt already opened one). `parse` reads a whole turn; `stream` (tool_stream.py) turns text
deltas into OpenAI deltas that add up to `parse`'s result. Malformed tool-call text never raises:
it stays content, no call is returned, and `error` says what was wrong and the expected form.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FAMILIES = ("klong", "glm45", "qwen3")

Tools = Sequence[Mapping[str, Any]] | None


@dataclasses.dataclass
class Parsed:
  """One assistant turn: visible content, reasoning (None if none), OpenAI tool calls, error."""

  content: str
  reasoning_content: str | None = None
  tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  error: str | None = None  # Why the tool-call text could not be parsed (then no tool_calls).


class CallError(ValueError):
  """A tool-call block that cannot be parsed; the message says what is wrong with it."""


def new_call_id() -> str:
  return f"call_{uuid.uuid4().hex[:24]}"


def openai_call(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
  """An OpenAI tool call with a fresh id and JSON-string arguments."""
  return {"id": new_call_id(), "type": "function",
          "function": {"name": name, "arguments": json.dumps(dict(arguments),
                                                             ensure_ascii=False)}}


def strip_stops(text: str, stops: Sequence[str]) -> str:
  """`text` without the end-of-turn texts it ends with (any chain of them)."""
  changed = True
  while changed:
    changed = False
    for s in stops:
      if s and text.endswith(s):
        text, changed = text[:-len(s)], True
  return text


def split_reasoning(text: str, in_think: bool = False) -> tuple[str | None, str]:
  """(reasoning or None, the rest) of a turn. Reasoning is a `<think>` block at the start (after
  whitespace), or the text up to `</think>` when the prompt opened the block (`in_think`); an
  unterminated block (max_tokens) is all reasoning. Whitespace around either part is dropped."""
  if in_think:
    start = 0
  else:
    lead = len(text) - len(text.lstrip())
    if not text.startswith(THINK_OPEN, lead):
      return None, text
    start = lead + len(THINK_OPEN)
  end = text.find(THINK_CLOSE, start)
  if end < 0:
    return text[start:].strip() or None, ""
  return text[start:end].strip() or None, text[end + len(THINK_CLOSE):].lstrip()


def opens_think(prompt_tail: str) -> bool:
  """Whether a prompt ending in `prompt_tail` left a `<think>` block open for the model."""
  return prompt_tail.rstrip().endswith(THINK_OPEN)


# ---- JSON-schema typing of GLM argument values ---------------------------------------------


def json_type(value: Any) -> str:
  """The JSON-schema type name of a decoded JSON value."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, int):
    return "integer"
  if isinstance(value, float):
    return "number"
  if isinstance(value, str):
    return "string"
  return "array" if isinstance(value, list) else "object"


def _schema_types(spec: Mapping[str, Any]) -> set[str] | None:
  """The types a property schema allows (`type`, unions, anyOf/oneOf, enum); None = unknown."""
  out: set[str] = set()
  t = spec.get("type")
  if isinstance(t, str):
    out.add(t)
  elif isinstance(t, list):
    out.update(x for x in t if isinstance(x, str))
  for key in ("anyOf", "oneOf"):
    for sub in spec.get(key) or ():
      sub_types = _schema_types(sub) if isinstance(sub, Mapping) else None
      if sub_types is None:
        return None
      out |= sub_types
  if not out and isinstance(spec.get("enum"), list):
    out = {json_type(v) for v in spec["enum"]}
  return out or None


def tool_function(tools: Tools, name: str) -> Mapping[str, Any] | None:
  """The `function` object of the tool called `name` (None if not offered)."""
  for t in tools or ():
    fn = t.get("function", t) if isinstance(t, Mapping) else None
    if isinstance(fn, Mapping) and fn.get("name") == name:
      return fn
  return None


def param_types(tools: Tools, name: str, key: str) -> set[str] | None:
  """The JSON types tool `name`'s schema allows for argument `key` (None if it does not say)."""
  fn = tool_function(tools, name)
  params = fn.get("parameters") if fn is not None else None
  props = params.get("properties") if isinstance(params, Mapping) else None
  spec = props.get(key) if isinstance(props, Mapping) else None
  return _schema_types(spec) if isinstance(spec, Mapping) else None


def _no_constants(name: str) -> Any:
  raise ValueError(f"{name} is not JSON")


def typed_value(raw: str, types_: set[str] | None) -> Any:
  """A GLM `<arg_value>` as the value it renders: raw text for strings, JSON otherwise.

  The template writes strings raw and everything else as JSON, so `types_` (the schema's types
  for the argument) decides: only "string" keeps the text; otherwise the text is decoded as JSON
  when it decodes to an allowed non-string type (any, when the schema does not say), else kept.
  """
  if types_ == {"string"}:
    return raw
  try:
    value = json.loads(raw, parse_constant=_no_constants)
  except (ValueError, RecursionError):
    return raw
  t = json_type(value)
  if t == "string":
    return raw
  if types_ is None or t in types_ or (t == "integer" and "number" in types_):
    return value
  return raw


# ---- the parsers ---------------------------------------------------------------------------


class ToolParser:
  """Splits a generated turn into reasoning, content and tool calls; one subclass per family.

  `call_open` starts a tool-call block; `stop_texts` are end-of-turn texts removed from the end
  of a turn; `strip_content` drops whitespace around the content (the native templates strip it
  when they render a turn); `expected_form` is quoted in errors so the model can fix its call.
  """

  family = ""
  call_open = call_close = ""
  expected_form = ""
  strip_content = True

  def __init__(self, stop_texts: Sequence[str] = ()):
    self.stop_texts = tuple(s for s in stop_texts if s)

  def parse(self, text: str, tools: Tools = None, in_think: bool = False) -> Parsed:
    """The whole turn `text` (stop texts at its end are dropped); never raises."""
    reasoning, rest = split_reasoning(strip_stops(text, self.stop_texts), in_think)
    try:
      content, calls = self.parse_calls(rest, tools)
      error = None
    except CallError as e:
      content, calls, error = rest, [], f"{e}; expected each tool call as {self.expected_form}"
    if self.strip_content:
      content = content.strip()
    return Parsed(content, reasoning, calls, error)

  def stream(self, tools: Tools = None, in_think: bool = False) -> Any:
    """An incremental parser of this turn's text deltas (tool_stream.StreamParser)."""
    from klong_jax.data.tool_stream import StreamParser  # noqa: PLC0415 - import cycle
    return StreamParser(self, tools, in_think)

  def parse_calls(self, rest: str, tools: Tools) -> tuple[str, list[dict[str, Any]]]:
    """(content outside the call blocks, OpenAI calls) of the text after reasoning."""
    pieces, calls, pos = [], [], 0
    while (i := rest.find(self.call_open, pos)) >= 0:
      pieces.append(rest[pos:i])
      start = i + len(self.call_open)
      j = rest.find(self.call_close, start)
      k = len(calls)
      if j < 0:
        raise CallError(f"tool call {k} has no closing {self.call_close} (was the turn cut off "
                        "by max_tokens?)")
      body = rest[start:j]
      if self.call_open in body:
        raise CallError(f"tool call {k} opens {self.call_open} again before closing it")
      name, args = self.parse_call(body, tools, k)
      check_tool_name(name, tools, k)
      calls.append(openai_call(name, args))
      pos = j + len(self.call_close)
    pieces.append(rest[pos:])
    if any(self.call_close in p for p in pieces):
      raise CallError(f"{self.call_close} without an opening {self.call_open}")
    return "".join(pieces), calls

  def parse_call(self, body: str, tools: Tools, k: int) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of one call block's body; raises CallError."""
    raise NotImplementedError


def check_tool_name(name: str, tools: Tools, k: int) -> None:
  """Raises CallError when `tools` were offered and `name` is not one of them."""
  if tools and tool_function(tools, name) is None:
    names = [str((t.get("function", t) or {}).get("name")) for t in tools
             if isinstance(t, Mapping)]
    raise CallError(f"tool call {k} names unknown tool {name!r}; available tools: "
                    f"{', '.join(names)}")


def _arguments(obj: Any, k: int) -> dict[str, Any]:
  """The `arguments` object of a decoded JSON call (a JSON-string object is accepted too)."""
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
    raise CallError(f"tool call {k} must be a JSON object with a string \"name\"")
  args = obj.get("arguments", obj.get("parameters", {}))
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except ValueError as e:
      raise CallError(f"tool call {k} ({obj['name']!r}) has string arguments that are not "
                      f"JSON: {e}") from None
  if not isinstance(args, dict):
    raise CallError(f"tool call {k} ({obj['name']!r}): \"arguments\" must be a JSON object, "
                    f"got {json_type(args)}")
  return args


class Qwen3Parser(ToolParser):
  """Qwen3 / Hermes style: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

  family = "qwen3"
  call_open, call_close = "<tool_call>", "</tool_call>"
  expected_form = '<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>'

  def __init__(self, stop_texts: Sequence[str] = ("<|im_end|>", "<|endoftext|>")):
    super().__init__(stop_texts)

  def parse_call(self, body: str, tools: Tools, k: int) -> tuple[str, dict[str, Any]]:
    try:
      obj = json.loads(body.strip(), parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
      raise CallError(f"tool call {k} is not valid JSON ({e})") from None
    args = _arguments(obj, k)
    return obj["name"], args


class Glm45Parser(ToolParser):
  """GLM-4.5: `<tool_call>NAME` + `<arg_key>K</arg_key><arg_value>V</arg_value>`... `</tool_call>`,
  values typed by the tool's schema (typed_value)."""

  family = "glm45"
  call_open, call_close = "<tool_call>", "</tool_call>"
  expected_form = ("<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n"
                   "</tool_call> (one arg_key/arg_value pair per argument; string values as "
                   "plain text, other values as JSON)")
  KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = ("<arg_key>", "</arg_key>", "<arg_value>",
                                                  "</arg_value>")

  def __init__(self, stop_texts: Sequence[str] = ("<|endoftext|>", "<|user|>",
                                                  "<|observation|>")):
    super().__init__(stop_texts)

  def parse_call(self, body: str, tools: Tools, k: int) -> tuple[str, dict[str, Any]]:
    first = body.find("<arg_")
    name = (body if first < 0 else body[:first]).strip()
    if not name or any(c.isspace() for c in name) or "<" in name:
      raise CallError(f"tool call {k} must start with the function name, got {name[:60]!r}")
    args: dict[str, Any] = {}
    pos = len(body) if first < 0 else first
    while True:
      pos = _skip_space(body, pos)
      if pos == len(body):
        return name, args
      key, pos = self._tagged(body, pos, self.KEY_OPEN, self.KEY_CLOSE, k, name, None)
      key = key.strip()
      pos = _skip_space(body, pos)
      if not body.startswith(self.VALUE_OPEN, pos):
        raise CallError(f"tool call {k} ({name!r}): {self.KEY_OPEN}{key}{self.KEY_CLOSE} has no "
                        f"{self.VALUE_OPEN} after it")
      raw, pos = self._tagged(body, pos, self.VALUE_OPEN, self.VALUE_CLOSE, k, name, key)
      if not key:
        raise CallError(f"tool call {k} ({name!r}) has an empty {self.KEY_OPEN}")
      if key in args:
        raise CallError(f"tool call {k} ({name!r}) gives argument {key!r} twice")
      args[key] = typed_value(raw, param_types(tools, name, key))

  @staticmethod
  def _tagged(body: str, pos: int, open_: str, close: str, k: int, name: str,
              key: str | None) -> tuple[str, int]:
    """(text inside open_...close at `pos`, position after it); raises CallError."""
    where = f"tool call {k} ({name!r})" + (f", argument {key!r}" if key else "")
    if not body.startswith(open_, pos):
      raise CallError(f"{where}: expected {open_} but found {body[pos:pos + 30]!r}")
    start = pos + len(open_)
    end = body.find(close, start)
    if end < 0:
      raise CallError(f"{where}: {open_} is not closed with {close}")
    return body[start:end], end + len(close)


def _skip_space(s: str, pos: int) -> int:
  while pos < len(s) and s[pos].isspace():
    pos += 1
  return pos


class _NoEos:
  """A tokenizer stand-in for data/chat.py's parser when no tokenizer is at hand."""

  eos_id = -1

  @staticmethod
  def decode(ids: Sequence[int]) -> str:
    del ids
    return ""


class KlongParser(ToolParser):
  """This repo's bundled format; the tool-call text is parsed by data/chat.py's parser. Tool
  names are left to the agent's registry (aliases count as known tools there)."""

  family = "klong"
  expected_form = '<|tool_call|>{"name": NAME, "arguments": {...}}<|/tool_call|>'
  strip_content = False

  def __init__(self, stop_texts: Sequence[str] | None = None, chat_format: Any = None):
    from klong_jax.data import chat  # noqa: PLC0415 - numpy + tokenizer only, kept lazy
    self._chat = chat_format if chat_format is not None else types.SimpleNamespace(tok=_NoEos())
    self._parse = chat.ChatFormat.parse_assistant
    self.call_open, self.call_close = chat.CALL_OPEN, chat.CALL_CLOSE
    if stop_texts is None:
      eos = chat_format.tok.decode([chat_format.tok.eos_id]) if chat_format is not None else ""
      stop_texts = (chat.END, eos)
    super().__init__(stop_texts)

  def parse_calls(self, rest: str, tools: Tools) -> tuple[str, list[dict[str, Any]]]:
    del tools  # names are not checked: the agent's registry resolves them, aliases included
    parsed = self._parse(self._chat, rest)  # (`end_task`, `python-tool`), and answers unknown
    if parsed.error:  # ones with an error observation, as the demo has always relied on
      raise CallError(parsed.error)
    return parsed.content, parsed.tool_calls


_PARSERS = {"klong": KlongParser, "glm45": Glm45Parser, "qwen3": Qwen3Parser}


def get_parser(family: str, chat_format: Any = None,
               stop_texts: Sequence[str] | None = None) -> ToolParser:
  """The parser of `family` (see FAMILIES); `chat_format` feeds the klong parser's stop texts."""
  if family not in _PARSERS:
    raise ValueError(f"unknown tool-call parser family {family!r}; choose one of "
                     f"{', '.join(FAMILIES)}")
  if family == "klong":
    return KlongParser(stop_texts, chat_format)
  return _PARSERS[family]() if stop_texts is None else _PARSERS[family](stop_texts)


# ---- which family a model speaks -----------------------------------------------------------


def template_text(source: str | os.PathLike | None) -> str:
  """The chat template (or, lacking one, the added tokens) of a tokenizer dir or file; any
  other string is taken as template text itself."""
  if source is None:
    return ""
  path = pathlib.Path(source)
  try:
    exists = path.exists()
  except (OSError, ValueError):
    exists = False
  if not exists:
    return str(source)
  folder = path if path.is_dir() else path.parent
  texts = []
  for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
    f = folder / name
    if not f.is_file():
      continue
    raw = f.read_text(encoding="utf-8", errors="replace")
    if name.endswith(".json"):
      try:
        tpl = json.loads(raw).get("chat_template")
      except (ValueError, AttributeError):
        tpl = None
      if isinstance(tpl, list):  # Named templates: [{"name": ..., "template": ...}].
        tpl = "\n".join(str(t.get("template", "")) for t in tpl if isinstance(t, dict))
      raw = tpl if isinstance(tpl, str) else ""
    texts.append(raw)
  if not any(texts) and (folder / "tokenizer.json").is_file():
    try:
      added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
      texts = [" ".join(str(t.get("content", "")) for t in added.get("added_tokens") or ())]
    except (ValueError, AttributeError):
      pass
  return "\n".join(texts)


def family_for(source: str | os.PathLike | None) -> str:
  """The parser family of a tokenizer dir/file or template text: `<arg_key>` -> glm45,
  `<|im_start|>` -> qwen3, else klong (a server or config flag can override it)."""
  text = template_text(source)
  if "<arg_key>" in text:
    return "glm45"
  if "<|im_start|>" in text:
    return "qwen3"
  return "klong"

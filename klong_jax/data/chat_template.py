"""A model directory's chat template, rendered and tokenized as transformers does it.

`load_spec(dir)` reads what a tokenizer/checkpoint directory says about chat: the Jinja template
(`chat_template.jinja`, or tokenizer_config.json `chat_template` as a string or a list of named
templates), the named special tokens (bos/eos/pad...), the added tokens and the stop ids
(generation_config.json `eos_token_id`). `render` runs the template in a sandboxed Jinja
environment set up like `transformers.utils.chat_template_utils` (trim_blocks, lstrip_blocks,
loopcontrols, `tojson` without HTML escaping, `raise_exception`, `strftime_now`), so the text
equals `apply_chat_template(..., tokenize=False)`. `encode` tokenizes it like
`apply_chat_template(..., sanitize_control_tokens=True)`: control-token strings inside messages,
tools or kwargs (a tool printing `<|im_end|>`) are wrapped in private-use markers before rendering
and encoded as plain text, so only the template's own tokens become special ids.
No JAX, no transformers imports (fleet-safe).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Private-use markers around control tokens found in inputs (the same code points transformers
# uses, so a string that already holds them is cleaned the same way).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclasses.dataclass(frozen=True)
class ChatSpec:
  """What a model directory says about chat: template(s), named special tokens, stop ids."""

  template: str | dict[str, str]
  special_tokens: dict[str, str]  # bos_token/eos_token/... -> token string (template kwargs)
  stop_ids: tuple[int, ...] | None  # generation_config.json eos_token_id; None if absent
  added_special: dict[str, bool]  # tokenizer_config added_tokens_decoder: content -> special
  source: str

  def template_for(self, tools: Any = None) -> str:
    """The template text to use (a dict of named templates picks `tool_use` or `default`)."""
    if isinstance(self.template, str):
      return self.template
    if tools is not None and "tool_use" in self.template:
      return self.template["tool_use"]
    if "default" in self.template:
      return self.template["default"]
    raise ValueError(f"{self.source} has several chat templates {sorted(self.template)} and no "
                     "'default'; name one in tokenizer_config.json")


def _token_str(v: Any) -> str | None:
  if isinstance(v, Mapping):
    v = v.get("content")
  return v if isinstance(v, str) else None


def load_spec(directory: str | pathlib.Path) -> ChatSpec | None:
  """The chat spec of a tokenizer/checkpoint dir, or None when it carries no chat template."""
  d = pathlib.Path(directory)
  cfg_path = d / "tokenizer_config.json"
  cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
  template: Any = None
  if (d / "chat_template.jinja").is_file():
    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
  elif (d / "chat_template.json").is_file():
    template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get(
        "chat_template")
  if template is None:
    template = cfg.get("chat_template")
  if isinstance(template, list):
    template = {t["name"]: t["template"] for t in template}
  if not template:
    return None
  special = {k: s for k in SPECIAL_TOKEN_KEYS if (s := _token_str(cfg.get(k))) is not None}
  added = {str(v["content"]): bool(v.get("special", False))
           for v in (cfg.get("added_tokens_decoder") or {}).values() if "content" in v}
  stops = None
  gen_path = d / "generation_config.json"
  if gen_path.is_file():
    eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is not None:
      stops = tuple(sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])}))
  return ChatSpec(template, special, stops, added, str(d))


# ---- Jinja environment ---------------------------------------------------------------------

def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


_NON_ASCII = re.compile(f"[^\x00-\x7f{MARK_START}{MARK_END}]")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  """json.dumps without HTML escaping (transformers' filter); ensure_ascii keeps the markers."""
  text = json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
                    sort_keys=sort_keys)
  if ensure_ascii:  # Escape like json.dumps would, but leave control-token markers intact.
    text = _NON_ASCII.sub(lambda m: json.dumps(m.group(0))[1:-1], text)
  return text


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
  """`namespace()` that refuses underscore attributes (no access to Python internals)."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
  """Accepts `{% generation %}...{% endgeneration %}` (rendered as its body; masks come from
  incremental rendering instead)."""

  tags = {"generation"}

  def parse(self, parser: Any) -> Any:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    return caller()


@functools.lru_cache(maxsize=32)
def compile_template(text: str) -> jinja2.Template:
  """The template compiled in a sandbox configured like transformers'."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     namespace=_Namespace, dict=dict)
  return env.from_string(text)


@functools.lru_cache(maxsize=32)
def literal_text(text: str) -> str:
  """The template's literal text and string constants, NUL-joined (to find its control tokens)."""
  ast = compile_template(text).environment.parse(text)
  parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
  parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
  return "\0".join(sorted(parts))


def control_tokens(template: str, added: Mapping[str, bool]) -> tuple[str, ...]:
  """Added tokens that inputs may not produce: every special one, plus the non-special ones the
  template itself writes (`<think>`, `<tool_call>`), as transformers infers them."""
  lit = literal_text(template)
  return tuple(t for t, special in added.items()
               if special or (t in lit and not t.isspace()))


# ---- inputs --------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
  """Plain JSON-like copy of what the template sees (no objects with methods in the sandbox)."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, bool):
    return bool(value)
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return float(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "item"):  # numpy scalars
    return _plain(value.item())
  return f"<{type(value).__name__}>"


def _parse_arguments(call: Mapping[str, Any]) -> Mapping[str, Any]:
  """A tool call with JSON-string arguments parsed (as vLLM does before templates render)."""
  fn = call.get("function", call)
  if not isinstance(fn, Mapping) or "name" not in fn:
    raise ValueError(f"tool call {call!r} has no function name")
  args = fn.get("arguments")
  if not isinstance(args, str):
    return call
  try:
    parsed = json.loads(args) if args.strip() else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"tool call {fn['name']!r} has arguments that are not JSON: {e}") from None
  fn = dict(fn, arguments=parsed)
  return dict(call, function=fn) if "function" in call else fn


DROP_KEYS = ("klong", "token_ids", "meta")  # bookkeeping the template never needs


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Messages as the template sees them: None-valued and bookkeeping keys dropped, reasoning
  under `reasoning_content` (aliases `thinking`/`reasoning`), tool-call arguments as objects,
  an assistant's missing content as ""."""
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")
    m = {k: v for k, v in m.items() if v is not None and k not in DROP_KEYS}
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    if m.get("tool_calls"):
      m["tool_calls"] = [_parse_arguments(c) for c in m["tool_calls"]]
    if m.get("role") == "assistant":  # OpenAI sends content None with tool calls; templates
      m.setdefault("content", "")  # (Qwen3's) index it as a string
    out.append(_plain(m))
  return out


def control_regex(tokens: Sequence[str]) -> re.Pattern[str]:
  """Matches any of `tokens`, longest first (a token wins over the tokens it contains)."""
  return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
                    or "(?!)")


def mark(obj: Any, regex: re.Pattern[str]) -> Any:
  """Wraps control-token strings inside input strings (not dict keys) in the markers."""
  if isinstance(obj, str):
    obj = obj.replace(MARK_START, "").replace(MARK_END, "")
    return regex.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
  if isinstance(obj, dict):
    return {k: mark(v, regex) for k, v in obj.items()}
  if isinstance(obj, list):
    return [mark(v, regex) for v in obj]
  return obj


def render(template: str, messages: list[dict[str, Any]], tools: Any = None,
           add_generation_prompt: bool = False, **kwargs: Any) -> str:
  """The template applied to already normalized (and marked) inputs; errors as ValueError."""
  try:
    return compile_template(template).render(
        messages=messages, tools=tools, documents=None,
        add_generation_prompt=add_generation_prompt, **kwargs)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"chat template: {e}") from e


@functools.lru_cache(maxsize=32)
def _marker_regex(tokens: tuple[str, ...]) -> re.Pattern[str]:
  return re.compile(f"{MARK_START}({control_regex(tokens).pattern}){MARK_END}"
                    f"|[{MARK_START}{MARK_END}]")


def encode(tok: Any, text: str) -> list[int]:
  """Token ids of rendered, marked text: marked control tokens as plain text, the rest (the
  template's own control tokens included) encoded normally. Lone markers (a template split a
  marked token) are dropped but still separate the text on either side."""
  pieces = _marker_regex(tuple(tok.added_tokens())).split(text)
  ids = tok.encode(pieces[0])
  for i, piece in enumerate(pieces[1:], start=1):
    if not piece:
      continue
    as_text = i % 2 == 1
    piece_ids = tok.encode_piece(piece, plain=as_text)
    if as_text and tok.piece_to_id(piece) in piece_ids:
      raise ValueError(f"cannot encode {piece!r} as text: the tokenizer makes it from plain text")
    ids += piece_ids
  return ids

"""Chat format: OpenAI-style messages (incl. tool calls and results) <-> token ids with loss masks.

Layout, one turn per message: `<|role|>` body `<|end|>`. An assistant body is its content followed
by one `<|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>` per call; the model generates
that text and stops on `<|end|>`. Tool specs, when given, form a `<|tools|>` JSON `<|end|>` block
before the first message. No JAX imports (the agent scaffold and inference server use this).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from klong_jax.data.tokenizer import Tokenizer

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "tool": "<|tool|>"}
END, TOOLS = "<|end|>", "<|tools|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


class Rendered(NamedTuple):
  """Token ids of a rendered conversation, the loss mask, and where each message starts."""

  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int32 [n], 1 only on assistant-generated tokens
  turn_starts: list[int]  # token index where message i starts


class ParsedAssistant(tuple):
  """`(content, tool_calls)` as a 2-tuple, plus `.error` (None, or why tool-call text was bad)."""

  def __new__(cls, content: str, tool_calls: list[dict[str, Any]], error: str | None = None):
    self = super().__new__(cls, (content, tool_calls))
    self.error = error
    return self

  @property
  def content(self) -> str:
    return self[0]

  @property
  def tool_calls(self) -> list[dict[str, Any]]:
    return self[1]


def message_text(content: Any) -> str:
  """Message content as text: a string, None, or a list of OpenAI content parts."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, Sequence):
    parts = []
    for p in content:
      if isinstance(p, Mapping) and p.get("type", "text") == "text":
        parts.append(str(p.get("text", "")))
      elif isinstance(p, str):
        parts.append(p)
      else:
        raise ValueError(f"unsupported content part {p!r}; only text parts can be rendered")
    return "".join(parts)
  raise ValueError(f"message content must be a string, None or a list of parts, got {content!r}")


def tool_call_text(call: Mapping[str, Any]) -> str:
  """One OpenAI tool call as the text the model generates for it."""
  fn = call.get("function", call)
  if "name" not in fn:
    raise ValueError(f"tool call {call!r} has no function name")
  args = fn.get("arguments", {})
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError as e:
      raise ValueError(f"tool call {fn['name']!r} has arguments that are not JSON: {e}") from None
  return CALL_OPEN + json.dumps({"name": fn["name"], "arguments": args}) + CALL_CLOSE


def assistant_text(message: Mapping[str, Any]) -> str:
  """The generated text of an assistant message: content then its tool calls."""
  text = message_text(message.get("content"))
  return text + "".join(tool_call_text(c) for c in message.get("tool_calls") or [])


class ChatFormat:
  """Renders conversations for training and generation and parses generated assistant text."""

  def __init__(self, tok: Tokenizer):
    self.tok = tok
    self.role_ids = {role: tok.special_id(t) for role, t in ROLE_TOKENS.items()}
    self.end_id = tok.special_id(END)
    self.tools_id = tok.special_id(TOOLS)
    self.call_open_id = tok.special_id(CALL_OPEN)
    self.call_close_id = tok.special_id(CALL_CLOSE)

  @property
  def stop_token_ids(self) -> list[int]:
    """Generation stops on end-of-turn (and on the tokenizer's eos)."""
    return sorted({self.end_id, self.tok.eos_id})

  @property
  def assistant_header(self) -> list[int]:
    return [self.role_ids["assistant"]]

  def tools_block(self, tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
    """The `<|tools|>` block for tool specs (empty when there are none)."""
    if not tools:
      return []
    return [self.tools_id] + self.tok.encode_untrusted(json.dumps(list(tools))) + [self.end_id]

  def header(self, message: Mapping[str, Any], index: int = 0) -> list[int]:
    role = message.get("role") if isinstance(message, Mapping) else None
    if role not in self.role_ids:
      raise ValueError(f"message {index} has bad role {role!r}; expected one of "
                       f"{sorted(self.role_ids)}")
    return [self.role_ids[role]]

  def body(self, message: Mapping[str, Any]) -> list[int]:
    """Token ids of a message body (without header and end token)."""
    if message["role"] == "assistant":
      return self.tok.encode(assistant_text(message))
    # System, user and tool text comes from outside the model: never as special tokens.
    return self.tok.encode_untrusted(message_text(message.get("content")))

  def sampled_ids(self, message: Mapping[str, Any]) -> list[int] | None:
    """The exact ids an assistant turn was sampled as (`token_ids`, or the worker's `klong`).

    Sent back with the history, they make the server's prompt the very tokens the trainer
    trains on (re-tokenizing sampled text need not give the same ids).
    """
    if message.get("role") != "assistant":
      return None
    ids = message.get("token_ids")
    if ids is None and isinstance(message.get("klong"), Mapping):
      ids = message["klong"].get("token_ids")
    if ids is None:
      return None
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
        isinstance(t, int) and 0 <= t < self.tok.vocab_size for t in ids):
      raise ValueError(f"assistant token_ids must be a list of ids in [0, "
                       f"{self.tok.vocab_size}), got {str(ids)[:80]}")
    return [int(t) for t in ids]

  def message_tokens(self, message: Mapping[str, Any], index: int = 0) -> tuple[list[int], int]:
    """(ids, header length) of one rendered message: header, body, end-of-turn token."""
    head = self.header(message, index)
    ids = self.sampled_ids(message)
    if ids is None:
      return head + self.body(message) + [self.end_id], len(head)
    if not ids or ids[-1] != self.end_id:
      ids = ids + [self.end_id]  # the turn ended without the stop token (length cut): close it
    return head + ids, len(head)

  def render(self, messages: Sequence[Mapping[str, Any]],
             tools: Sequence[Mapping[str, Any]] | None = None) -> Rendered:
    """Token ids + loss mask (1 on assistant body and its end token) + message start indices."""
    ids, mask, starts = [], [], []
    block = self.tools_block(tools)
    ids += block
    mask += [0] * len(block)
    for i, m in enumerate(messages):
      starts.append(len(ids))
      toks, head = self.message_tokens(m, i)
      ids += toks
      mask += [0] * head + [int(m["role"] == "assistant")] * (len(toks) - head)
    return Rendered(np.asarray(ids, np.int32), np.asarray(mask, np.int32), starts)

  def render_prompt(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Prompt ids for generation: the rendered conversation plus the assistant header."""
    return self.render(messages, tools).tokens.tolist() + self.assistant_header

  def parse_assistant(self, text: str) -> ParsedAssistant:
    """Splits generated text into content and OpenAI-shaped tool calls; never raises.

    Malformed tool-call text (unterminated block, bad JSON, no name) keeps the whole text as
    content, returns no tool calls, and sets `.error`.
    """
    for stop in (END, self.tok.decode([self.tok.eos_id])):
      if stop and text.endswith(stop):
        text = text[: -len(stop)]
    if CALL_OPEN not in text and CALL_CLOSE not in text:
      return ParsedAssistant(text, [])
    calls, pieces, pos = [], [], 0
    for i, m in enumerate(_CALL_RE.finditer(text)):
      pieces.append(text[pos:m.start()])
      pos = m.end()
      try:
        obj = json.loads(m.group(1))
      except json.JSONDecodeError as e:
        return ParsedAssistant(text, [], f"tool call {i} is not valid JSON: {e}")
      if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParsedAssistant(text, [], f"tool call {i} must be an object with a string 'name'")
      args = obj.get("arguments", {})
      if not isinstance(args, dict):
        return ParsedAssistant(text, [], f"tool call {i} 'arguments' must be an object")
      calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    rest = text[pos:]
    if CALL_OPEN in rest or CALL_CLOSE in rest:
      return ParsedAssistant(text, [], "unterminated or unbalanced tool-call block")
    if any(CALL_OPEN in p or CALL_CLOSE in p for p in pieces):
      return ParsedAssistant(text, [], "nested or unbalanced tool-call block")
    return ParsedAssistant("".join(pieces) + rest, calls)

"""The klong chat format as hand-written code before it became a Jinja template (reference).

Frozen from klong_jax/data/chat.py as of the commit before the template: one message at a time,
`<|role|>` + body + `<|end|>`, tools as a `<|tools|>` JSON `<|end|>` block; untrusted text with
special-token strings encoded as `<` + the rest. Tests check the template renders the same ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "tool": "<|tool|>"}


SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|tool_call|>",
            "<|/tool_call|>", "<|tools|>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")


def _untrusted(tok: Any, text: str) -> list[int]:
  """Each special-token string as `<` + the rest, the text between encoded apart."""
  ids: list[int] = []
  for i, part in enumerate(_SPECIAL_RE.split(text)):
    if part:
      ids += tok.encode(part[0]) + tok.encode(part[1:]) if i % 2 else tok.encode(part)
  return ids


def _text(content: Any) -> str:
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content)


def _assistant_text(m: Mapping[str, Any]) -> str:
  out = _text(m.get("content"))
  for call in m.get("tool_calls") or []:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
      args = json.loads(args) if args.strip() else {}
    out += "<|tool_call|>" + json.dumps({"name": fn["name"], "arguments": args}) + \
        "<|/tool_call|>"
  return out


def render(tok: Any, messages: Sequence[Mapping[str, Any]],
           tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], list[int]]:
  """(ids, loss mask) as the old ChatFormat.render built them."""
  end = tok.special_id("<|end|>")
  ids, mask = [], []
  if tools:
    block = [tok.special_id("<|tools|>")] + _untrusted(tok, json.dumps(list(tools))) + [end]
    ids += block
    mask += [0] * len(block)
  for m in messages:
    ids.append(tok.special_id(ROLE_TOKENS[m["role"]]))
    mask.append(0)
    sampled = (m.get("klong") or {}).get("token_ids") if m["role"] == "assistant" else None
    if sampled is not None:
      body = list(sampled) + ([] if sampled and sampled[-1] == end else [end])
      ids += body
      mask += [1] * len(sampled) + [0] * (len(body) - len(sampled))
      continue
    if m["role"] == "assistant":
      body = tok.encode(_assistant_text(m)) + [end]
    else:
      body = _untrusted(tok, _text(m.get("content"))) + [end]
    ids += body
    mask += [int(m["role"] == "assistant")] * len(body)
  return ids, mask

"""Streaming side of data/tool_parsers.py: text deltas -> reasoning/content deltas, calls last.

Reasoning and content go out as soon as they are certain. Text that may still become a tag or an
end-of-turn text is held back, and so is whitespace the whole-turn parse would strip, until more
text follows. Everything from the first tool-call tag on waits for the end of the turn: `finish`
parses the whole turn and returns what is left plus the tool calls, or, for a malformed call, the
held text as content with the error. The deltas add up to `ToolParser.parse` of the whole text,
however it was split. No JAX imports.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from klong_jax.data.tool_parsers import THINK_CLOSE, THINK_OPEN, Parsed, Tools

if TYPE_CHECKING:
  from klong_jax.data.tool_parsers import ToolParser

log = logging.getLogger(__name__)

REASONING, CONTENT = "reasoning_content", "content"


class StreamParser:
  """Feed a turn's text deltas with `feed` (-> {"reasoning_content"?, "content"?} deltas), then
  call `finish` once (-> (the last deltas, the whole turn's Parsed))."""

  def __init__(self, parser: ToolParser, tools: Tools = None, in_think: bool = False):
    self.parser, self.tools, self.in_think = parser, tools, in_think
    self.text = ""
    self._markers = (THINK_CLOSE, parser.call_open, *parser.stop_texts)
    self._r_start: int | None = 0 if in_think else None  # Reasoning start; -1: no think block.
    self._r_end: int | None = None  # Where `</think>` is.
    self._c_start: int | None = None  # Where the content region starts.
    self._c_lstrip = parser.strip_content
    self._call_at: int | None = None  # The first tool-call tag.
    self._scan = {REASONING: 0, CONTENT: 0}  # Searched for the closing tag up to here.
    self._begin: dict[str, int] = {}  # First non-space index of a left-stripped part.
    self._sent = {REASONING: 0, CONTENT: 0}  # Text index each part was sent up to.
    self._pieces: dict[str, list[str]] = {REASONING: [], CONTENT: []}

  def feed(self, delta: str) -> dict[str, str]:
    """Adds generated text; returns the reasoning/content now certain (keys only when non-empty)."""
    self.text += delta
    return self._advance()

  def finish(self) -> tuple[dict[str, Any], Parsed]:
    """Ends the turn: (deltas still due, the whole turn's Parsed: tool calls, error)."""
    final = self.parser.parse(self.text, self.tools, self.in_think)
    out: dict[str, Any] = {}
    for key, value in ((REASONING, final.reasoning_content or ""), (CONTENT, final.content)):
      sent = "".join(self._pieces[key])
      if not value.startswith(sent):  # A bug, never a crash: the stream already went out.
        log.error("streamed %s %r is not a prefix of the parsed %r", key, sent[:80], value[:80])
        continue
      if len(value) > len(sent):
        out[key] = value[len(sent):]
    return out, final

  # ---- internals ---------------------------------------------------------------------------

  def _hold_start(self) -> int:
    """Where the held tail starts: the longest proper prefix of a tag or stop text at the end,
    and any complete stop texts before it (the whole-turn parse drops those at the end)."""
    t, stops = self.text, self.parser.stop_texts
    end = len(t)
    for m in self._markers:
      for n in range(min(len(m) - 1, len(t)), 0, -1):
        if t.endswith(m[:n]):
          end = min(end, len(t) - n)
          break
    changed = True
    while changed:
      changed = False
      for s in stops:
        if end >= len(s) and t.endswith(s, 0, end):
          end, changed = end - len(s), True
    return end

  def _emit(self, key: str, lo: int, hi: int, lstrip: bool, rstrip: bool) -> str:
    """Sends text[lo:hi] of part `key` (stripped as the whole-turn parse strips) not yet sent."""
    t = self.text
    if lstrip:
      begin = self._begin.get(key)
      if begin is None:
        seg = t[lo:hi]
        lead = len(seg) - len(seg.lstrip())
        if lead == len(seg):
          return ""
        begin = self._begin[key] = lo + lead
      lo = begin
    if rstrip:
      while hi > lo and t[hi - 1].isspace():
        hi -= 1
    start = max(self._sent[key], lo)
    if hi <= start:
      return ""
    self._sent[key] = hi
    self._pieces[key].append(t[start:hi])
    return t[start:hi]

  def _find(self, key: str, tag: str, lo: int) -> int:
    """Index of `tag` at or after `lo`, scanning only text not searched before; -1 if absent."""
    i = self.text.find(tag, max(lo, self._scan[key]))
    if i < 0:
      self._scan[key] = max(0, len(self.text) - len(tag) + 1)
    return i

  def _advance(self) -> dict[str, str]:
    t, out = self.text, {}
    hold = self._hold_start()
    if self._r_start is None:  # Does the turn open with <think>?
      lead = len(t) - len(t.lstrip())
      if lead == len(t) or THINK_OPEN.startswith(t[lead:]) and not t.startswith(THINK_OPEN, lead):
        return out
      if t.startswith(THINK_OPEN, lead):
        self._r_start = lead + len(THINK_OPEN)
      else:
        self._r_start, self._c_start = -1, 0
    if self._r_start >= 0:
      if self._r_end is None and (e := self._find(REASONING, THINK_CLOSE, self._r_start)) >= 0:
        self._r_end, self._c_start, self._c_lstrip = e, e + len(THINK_CLOSE), True
      hi = self._r_end if self._r_end is not None else max(hold, self._r_start)
      if r := self._emit(REASONING, self._r_start, hi, True, True):
        out[REASONING] = r
    if self._c_start is not None:
      if self._call_at is None and (i := self._find(CONTENT, self.parser.call_open,
                                                    self._c_start)) >= 0:
        self._call_at = i
      hi = self._call_at if self._call_at is not None else max(hold, self._c_start)
      if c := self._emit(CONTENT, self._c_start, hi, self._c_lstrip, self.parser.strip_content):
        out[CONTENT] = c
    return out

"""Incremental detokenization and stop-string matching for streamed generation.

Decoding a slice of ids in isolation can differ from decoding it in context (SentencePiece drops a
leading space; a multi-byte character can be split across tokens), so each new piece is decoded
together with a few tokens of left context and only the extension is emitted (vLLM's approach),
and text ending in an incomplete character (U+FFFD) is held until the next token completes it;
`flush()` emits what is still held when generation ends (with U+FFFD for incomplete bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_CONTEXT = 4


class IncrementalDetokenizer:
  """Turns a growing list of ids into text deltas in O(new tokens) per step."""

  def __init__(self, decode: Callable[[Sequence[int]], str]):
    self._decode = decode
    self.ids: list[int] = []
    self._prefix = 0  # Start of the context window.
    self._read = 0  # Ids before this have been emitted as text.

  def push(self, token_id: int) -> str:
    """Adds one id; returns the newly complete text (may be empty)."""
    self.ids.append(int(token_id))
    before = self._decode(self.ids[self._prefix:self._read])
    after = self._decode(self.ids[self._prefix:])
    if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
      return ""
    self._prefix = max(0, len(self.ids) - _CONTEXT)
    self._read = len(self.ids)
    return after[len(before):]

  def flush(self) -> str:
    """The text still held back (e.g. a trailing incomplete UTF-8 sequence, decoded as U+FFFD);
    called once generation has ended, so nothing generated is silently dropped."""
    if self._read == len(self.ids):
      return ""
    before = self._decode(self.ids[self._prefix:self._read])
    after = self._decode(self.ids[self._prefix:])
    self._prefix = self._read = len(self.ids)
    return after[len(before):]


class StopMatcher:
  """Accumulates text, finds the earliest stop string, and holds back text that may start one."""

  def __init__(self, stops: Sequence[str]):
    self.stops = tuple(s for s in stops if s)
    self._hold = max((len(s) for s in self.stops), default=1) - 1
    self.text = ""
    self._emitted = 0
    self.stopped = False

  def feed(self, delta: str) -> str:
    """Adds `delta`; returns the text now safe to emit; sets `stopped` on a stop string."""
    start = max(0, len(self.text) - self._hold)
    self.text += delta
    hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
    if hits:
      self.text = self.text[:min(hits)]
      self.stopped = True
      return self.flush()
    safe = len(self.text) - self._hold
    if safe <= self._emitted:
      return ""
    out = self.text[self._emitted:safe]
    self._emitted = safe
    return out

  def flush(self) -> str:
    """Everything not yet emitted (at the end of generation)."""
    out = self.text[self._emitted:]
    self._emitted = len(self.text)
    return out

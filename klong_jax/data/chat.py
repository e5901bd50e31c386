"""Chat format: OpenAI-style messages (incl. tool calls, results, reasoning) <-> token ids + masks.

One code path for every model: the tokenizer directory's Jinja chat template (chat_template.py;
GLM-4.5, Qwen3, or klong's own `assets/klong_chat_template.jinja`, where each message is `<|role|>`
body `<|end|>` and calls are `<|tool_call|>{json}<|/tool_call|>`). A conversation is rendered
incrementally, turn by turn: the prompt of assistant turn k is the template's rendering of the
messages before it plus its generation prompt; the turn itself is its sampled ids (`token_ids` /
`klong.token_ids`) verbatim, or the template's rendering of it as the newest message, cut after
the first stop token (Qwen `<|im_end|>`, klong `<|end|>`; GLM ends a turn with the next role
token, which joins the turn's loss mask and span: the next message starts after it). Where the
template re-renders history differently from what was generated (Qwen drops earlier reasoning
after a new user query, GLM drops it too), the generated form is kept and the turn is listed in
`Rendered.drift`; without drift the tokens equal transformers'
`apply_chat_template(..., sanitize_control_tokens=True)`. A GLM teacher turn that ends the
conversation has no stop token (the template renders none); sampled turns keep theirs.
No JAX imports (the agent scaffold and inference server use this).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from klong_jax.data import chat_template as ct
from klong_jax.data.tokenizer import CHAT_SPECIAL_TOKENS, KLONG_TEMPLATE, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "tool": "<|tool|>"}
END, TOOLS = "<|end|>", "<|tools|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
CACHE_SIZE = 16  # conversations whose rendering a later, longer request resumes
TEXT_CACHE_SIZE = 64  # template renderings of conversation prefixes, reused across requests
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


class Rendered(NamedTuple):
  """Token ids of a rendered conversation, the loss mask, and where each message starts."""

  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int32 [n], 1 only on assistant-generated tokens
  turn_starts: list[int]  # token index where message i starts (after the previous turn's stop)
  drift: tuple[int, ...] = ()  # assistant turns the template later re-rendered differently
  sampled: dict[int, tuple[int, int]] | None = None  # message -> (start, count) of sampled ids
  joined: tuple[int, ...] = ()  # messages whose role token ended the previous turn (GLM): it is
  # in that turn's loss span, so a context window cannot start at them


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


class _Ctx(NamedTuple):
  template: str
  ctrl: re.Pattern[str]
  tools: Any
  kwargs: dict[str, Any]


def _lcp(a: str, b: str) -> int:
  """Length of the common prefix (slice comparisons run in C; binary search)."""
  if b.startswith(a):
    return len(a)
  lo, hi = 0, min(len(a), len(b))
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


@dataclasses.dataclass
class _State:
  """Where a turn-by-turn rendering stands after an assistant turn (cached to resume from)."""

  ids: list[int]
  mask: list[int]
  starts: list[int]
  sampled: dict[int, tuple[int, int]]
  drift: list[int]
  joined: list[int]
  base: str  # the template text the stream stands for
  prev_turn: str  # the last turn's template text
  done: int  # messages rendered
  pending: tuple[str, int | None] | None  # the last turn's terminator is still to come (GLM)

  def copy(self) -> _State:
    return _State(list(self.ids), list(self.mask), list(self.starts), dict(self.sampled),
                  list(self.drift), list(self.joined), self.base, self.prev_turn, self.done,
                  self.pending)


class ChatFormat:
  """Renders conversations for training and generation with the model's chat template, and
  parses generated klong-format assistant text."""

  def __init__(self, tok: Tokenizer, spec: ct.ChatSpec | None = None):
    self.tok = tok
    self.is_klong = all(tok.piece_to_id(t) is not None for t in CHAT_SPECIAL_TOKENS)
    if spec is None and tok.chat_dir:
      spec = ct.load_spec(tok.chat_dir)
    if spec is None:
      if not self.is_klong:
        raise TokenizerError(
            f"tokenizer {tok.path} comes with no chat template: put the model's "
            "tokenizer_config.json (with `chat_template`) or chat_template.jinja beside it, or "
            "load the model directory itself")
      spec = ct.ChatSpec(KLONG_TEMPLATE.read_text(encoding="utf-8"), {}, None, {}, "klong")
    self.spec = spec
    if self.is_klong:
      self.role_ids = {role: tok.special_id(t) for role, t in ROLE_TOKENS.items()}
      self.end_id = tok.special_id(END)
      self.tools_id = tok.special_id(TOOLS)
      self.call_open_id = tok.special_id(CALL_OPEN)
      self.call_close_id = tok.special_id(CALL_CLOSE)
    stops = spec.stop_ids
    if stops is None:
      stops = (self.end_id, tok.eos_id) if self.is_klong else (tok.eos_id,)
    self._stops = frozenset(int(s) for s in stops)
    added = tok.added_tokens()
    strings = [tok.decode([s]) for s in self._stops]
    strings = [s for s in strings if s in added]
    self._stop_re = re.compile(f"(?<!{ct.MARK_START})(" + "|".join(
        re.escape(s) for s in sorted(strings, key=len, reverse=True)) + ")" if strings else "(?!)")
    self._added_re = ct.control_regex(list(added))
    self._cache: collections.OrderedDict[tuple[bool, str], _State] = collections.OrderedDict()
    self._texts: collections.OrderedDict[tuple[str, bool], str] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._drift_logged = False

  @property
  def stop_token_ids(self) -> list[int]:
    """Generation stops on these ids (generation_config.json eos_token_id, else end and eos)."""
    return sorted(self._stops)

  # ---- rendering ---------------------------------------------------------------------------

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
    arr = np.asarray(ids) if isinstance(ids, (Sequence, np.ndarray)) and not isinstance(
        ids, str) else None  # vectorized check: every request validates the whole history
    if arr is None or arr.ndim != 1 or (arr.size and (
        arr.dtype.kind not in "iub" or arr.min() < 0 or arr.max() >= self.tok.vocab_size)):
      raise ValueError(f"assistant token_ids must be a list of ids in [0, "
                       f"{self.tok.vocab_size}), got {str(ids)[:80]}")
    return arr.astype(np.int64).tolist()

  def _context(self, tools: Any = None, kwargs: Mapping[str, Any] | None = None) -> _Ctx:
    """Template, control-token regex and marked tools/kwargs for one rendering."""
    tpl = self.spec.template_for(tools)
    ctrl = ct.control_regex(ct.control_tokens(tpl, self.tok.added_tokens()))
    marked_tools = None if tools is None else ct.mark(ct._plain(list(tools)), ctrl)
    kw = {**self.spec.special_tokens, **ct.mark(ct._plain(dict(kwargs or {})), ctrl)}
    return _Ctx(tpl, ctrl, marked_tools, kw)

  @staticmethod
  def _text(c: _Ctx, messages: list[dict[str, Any]], gen: bool = False) -> str:
    return ct.render(c.template, messages, c.tools, gen, **c.kwargs)

  def _encode(self, text: str) -> list[int]:
    return ct.encode(self.tok, text)

  def _joins(self, left: str, right: str) -> bool:
    """Whether encoding `left` and `right` apart equals encoding them together."""
    if not left or not right:
      return True
    tail = self._added_re.split(left)[-1]  # text after the last added token (encoded apart)
    if not tail or self._added_re.match(right):
      return True
    return self._encode(tail + right) == self._encode(tail) + self._encode(right)

  def _tail(self, x: str, base: str, pending: bool) -> tuple[str, bool]:
    """`x` after the part aligned with `base` (the rendering the stream holds); drift when the
    template rendered that history differently, realigned on the stop tokens (roles)."""
    if x.startswith(base):
      return x[len(base):], False
    want = [m.group(0) for m in self._stop_re.finditer(base)]
    got = list(self._stop_re.finditer(x))
    n = len(want)
    if len(got) < n + pending or [m.group(0) for m in got[:n]] != want or (not n and not pending):
      raise ValueError("the chat template re-renders earlier turns with other turn boundaries; "
                       "cannot align it with the generated history")
    cut = got[n].start() if pending else got[n - 1].end()
    return x[cut:], True

  def _start_in(self, text: Any, i: int, x: str, offset: int, tail: str, st: _State) -> int:
    """Where message i starts in `tail` (= x[offset:]): the end of the rendering of the
    messages before it, aligned with the stream like `tail` (so re-rendered history before the
    tail, e.g. GLM dropping reasoning, does not move it); else where that rendering stops
    matching x."""
    try:
      ti = self._tail(text(i), st.base, st.pending is not None)[0]
      if tail.startswith(ti):
        return len(ti)
    except ValueError:  # no pending stop yet (i == done), or the template cannot render it
      pass
    try:
      return _lcp(text(i), x) - offset
    except ValueError:  # the template cannot render that prefix (e.g. no messages)
      return 0

  def _digests(self, c: _Ctx, messages: Sequence[Mapping[str, Any]],
               marked: list[dict[str, Any]]) -> list[str]:
    """d[k] identifies the rendering inputs of messages[:k] (template, tools, kwargs, ids)."""
    h = hashlib.sha1(json.dumps([c.template, c.tools, c.kwargs], sort_keys=True,
                                default=str).encode())
    out = [h.hexdigest()]
    for raw, m in zip(messages, marked, strict=True):
      h.update(json.dumps([m, self.sampled_ids(raw)], sort_keys=True, default=str).encode())
      out.append(h.hexdigest())
    return out

  def _build(self, messages: Sequence[Mapping[str, Any]], tools: Any, gen_prompt: bool,
             starts: bool, kwargs: Mapping[str, Any]) -> Rendered:
    c = self._context(tools, kwargs)
    marked = ct.mark(ct.normalize_messages(messages), c.ctrl)
    n = len(marked)
    assistants = [i for i, m in enumerate(marked) if m.get("role") == "assistant"]
    digests = self._digests(c, messages, marked)
    st = _State([], [], [0] * n, {}, [], [], "", "", 0, None)
    with self._lock:  # resume after the newest cached assistant turn of this conversation
      for a in reversed(assistants):
        hit = self._cache.get((starts, digests[a + 1]))
        if hit is not None:
          self._cache.move_to_end((starts, digests[a + 1]))
          st = hit.copy()
          st.starts += [0] * (n - len(st.starts))
          break
    texts: dict[tuple[int, bool], str] = {}

    def text(k: int, gen: bool = False) -> str:
      if (k, gen) not in texts:
        key = (digests[k], gen)  # a later, longer request renders the same prefixes again
        with self._lock:
          hit = self._texts.get(key)
        if hit is None:
          hit = self._text(c, marked[:k], gen)
          with self._lock:
            self._texts[key] = hit
            while len(self._texts) > TEXT_CACHE_SIZE:
              self._texts.popitem(last=False)
        texts[k, gen] = hit
      return texts[k, gen]

    ids, mask = st.ids, st.mask
    for a in [i for i in assistants if i >= st.done] + [n]:
      x = text(n, gen_prompt) if a == n else text(a, True)
      tail, drifted = self._tail(x, st.base, st.pending is not None)
      if (drifted or not self._joins(st.prev_turn, tail)) and st.done:
        st.drift.append(st.done - 1)
      tail_ids = self._encode(tail)
      tail_start, dropped = len(ids), 0
      if st.pending is not None and tail_ids and tail_ids[0] in self._stops:
        kind, stop = st.pending
        if kind == "teacher":  # GLM: the next role token ends the turn; the model emits it
          ids.append(tail_ids.pop(0))
          mask.append(1)
          tail_start += 1
          dropped = 1
          st.joined += [st.done] if st.done < n else []
        elif stop == tail_ids[0]:  # the sampled stop token already stands for it
          tail_ids.pop(0)
          dropped = 1
          st.joined += [st.done] if st.done < n else []
      if starts:
        offset = len(x) - len(tail)
        rel = 0
        for i in range(st.done, min(a + 1, n)):
          rel = max(rel, self._start_in(text, i, x, offset, tail, st))
          k = len(self._encode(tail[:rel])) - dropped if rel else 0
          st.starts[i] = tail_start + max(0, min(k, len(tail_ids)))
      ids += tail_ids
      mask += [0] * len(tail_ids)
      if a == n:
        break
      q = text(a + 1)
      if not q.startswith(x):
        raise ValueError(f"the chat template does not render message {a} after its generation "
                         "prompt, so what the model generates for it is undefined")
      g = q[len(x):]
      m = self._stop_re.search(g)
      turn = g if m is None else g[:m.end()]
      s_ids = self.sampled_ids(messages[a])
      if s_ids is None:
        if not self._joins(x, turn):
          st.drift.append(a)
        t_ids = self._encode(turn)
        ids += t_ids
        mask += [1] * len(t_ids)
        st.pending = ("teacher", None) if m is None else None
      else:
        st.sampled[a] = (len(ids), len(s_ids))
        ids += s_ids
        mask += [1] * len(s_ids)
        stop = s_ids[-1] if s_ids and s_ids[-1] in self._stops else None
        st.pending = None
        if m is None:
          st.pending = ("sampled", stop)
        elif stop is None:  # length cut: close the turn with the template's terminator, untrained
          ids.append(self._encode(turn)[-1])
          mask.append(0)
      st.base, st.prev_turn, st.done = x + turn, turn, a + 1
      if a == assistants[-1]:
        snap = st.copy()
        snap.starts = snap.starts[:a + 1]
        with self._lock:
          self._cache[starts, digests[a + 1]] = snap
          while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
    if st.drift and not self._drift_logged:
      self._drift_logged = True
      log.info("%s: the chat template re-renders earlier assistant turns differently from how "
               "they were generated (turns %s); rendering turn by turn keeps what was generated "
               "(reported once per format; see Rendered.drift)", self.spec.source, st.drift[:5])
    return Rendered(np.asarray(ids, np.int32), np.asarray(mask, np.int32), st.starts,
                    tuple(sorted(set(st.drift))), st.sampled, tuple(st.joined))

  def render(self, messages: Sequence[Mapping[str, Any]],
             tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> Rendered:
    """Token ids + loss mask (1 on what each assistant turn generates, its stop token included)
    + message start indices + drifted turns. `template_kwargs` reach the template
    (e.g. enable_thinking)."""
    return self._build(messages, tools, False, True, template_kwargs)

  def render_prompt(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    **template_kwargs: Any) -> list[int]:
    """Prompt ids for generation: the conversation as `render` builds it plus the generation
    prompt, so the next turn's prompt begins with this one's exact ids."""
    return self._build(messages, tools, True, False, template_kwargs).tokens.tolist()

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

"""The context policy: which tokens the model sees for each action, for inference AND training.

One rule (KLong's trajectory splitting, made causal so an agent can follow it live): the model
always sees the fixed prefix plus a window of later history. A window stays open while the next
action still fits (prefix + window + `reserve` <= `max_len`, `reserve` = the reply's token budget);
when it does not, a new window opens at the earliest message start at most `overlap` tokens before
the action (never on a tool result, whose call would be cut off). The scaffold (agent/scaffold.py)
applies it turn by turn; the splitter (data/splitting.py) replays it over a finished trajectory,
so every action is trained on exactly the context it was sampled under. No JAX imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

# An assistant turn costs its reply plus the role header and the end-of-turn token.
TURN_OVERHEAD = 2


class ContextError(ValueError):
  """A context policy that cannot work for a prefix or an action; names the values and the fix."""


class Window(NamedTuple):
  """History window after the prefix: context [start, new_start), new tokens [new_start, end)."""

  start: int
  new_start: int
  end: int


@dataclasses.dataclass(frozen=True)
class ContextPolicy:
  """Context window shared by the agent (inference) and the splitter (training).

  max_len: model context = training chunk length (tokens, prefix included).
  overlap: at most this many history tokens before an action carry over into a new window.
  completion_tokens: the reply budget (max_tokens of each call); 0 = fit the actual reply only
    (training on data whose sampling budget is unknown).
  min_new_frac: a config whose window admits fewer than this share of max_len new tokens after
    the prefix, the overlap and the reply budget is refused (chunks would repeat the prefix for a
    handful of new tokens).
  """

  max_len: int
  overlap: int = 0
  completion_tokens: int = 0
  min_new_frac: float = 0.1

  def __post_init__(self):
    if self.max_len < 1 or self.overlap < 0 or self.completion_tokens < 0:
      raise ContextError(f"context policy needs max_len >= 1, overlap >= 0 and "
                         f"completion_tokens >= 0, got {self}")
    if not 0.0 <= self.min_new_frac < 1.0:
      raise ContextError(f"context policy min_new_frac must be in [0, 1), got {self.min_new_frac}")

  @property
  def reserve(self) -> int:
    """Tokens kept free for the next action (0 when the budget is unknown)."""
    return self.completion_tokens + TURN_OVERHEAD if self.completion_tokens else 0

  def check_prefix(self, prefix_len: int, what: str = "the fixed prefix") -> None:
    """Raises ContextError unless a window after a `prefix_len`-token prefix has real room."""
    new = self.max_len - prefix_len - self.overlap - self.reserve
    need = max(1, int(self.min_new_frac * self.max_len))
    if new < need:
      raise ContextError(
          f"{what} is {prefix_len} tokens: with max_len={self.max_len}, overlap={self.overlap} "
          f"and a reply budget of {self.reserve} tokens a window holds only {new} new tokens "
          f"(< {need} = min_new_frac*max_len); raise max_len, or lower overlap or "
          "completion_tokens (the paper is never cut out of the prefix)")

  def fits(self, prefix_len: int, context_len: int, action_len: int = 0) -> bool:
    """Whether an action after `context_len` history tokens fits (its actual length or budget)."""
    return prefix_len + context_len + max(self.reserve, action_len) <= self.max_len

  def window_start(self, prefix_len: int, starts: Sequence[int], can_start: Sequence[bool],
                   current: int, action: int, action_len: int = 0) -> int:
    """The message index the window must start at for the action that is message `action`.

    `starts[i]` is message i's offset in the history (tokens; `starts[action]` = where the
    action begins), `current` the open window's first message. Keeps `current` while the action
    fits, else the earliest startable message within `overlap` tokens that fits.
    """
    at = starts[action]
    if self.fits(prefix_len, at - starts[current], action_len):
      return current
    for i in range(current + 1, action + 1):
      if (i == action or can_start[i]) and at - starts[i] <= self.overlap and self.fits(
          prefix_len, at - starts[i], action_len):
        return i
    raise ContextError(
        f"an action of {max(self.reserve, action_len)} tokens (reply budget or actual length) "
        f"does not fit after a {prefix_len}-token prefix in max_len={self.max_len}; raise "
        "max_len or lower completion_tokens")

  def plan(self, prefix_len: int, lengths: Sequence[int], is_action: Sequence[bool],
           can_start: Sequence[bool]) -> list[Window]:
    """The windows (history token coordinates) the scaffold opened over a finished history.

    `lengths[i]` is message i's token length. A window ends after its last action (trailing
    tool output is context of the next window only); a history without actions is one window.
    """
    self.check_prefix(prefix_len)
    starts = [0]
    for n in lengths:
      starts.append(starts[-1] + int(n))
    windows: list[Window] = []
    ws, new_start, end = 0, 0, None
    for j, act in enumerate(is_action):
      if not act:
        continue
      w = self.window_start(prefix_len, starts, can_start, ws, j, int(lengths[j]))
      if w != ws:
        if end is not None:
          windows.append(Window(starts[ws], new_start, end))
        ws, new_start = w, starts[j]
      end = starts[j + 1]
    if end is None:  # Prefix + history without any action: one context-only window.
      end = min(starts[-1], max(0, self.max_len - prefix_len))
    windows.append(Window(starts[ws], new_start, end))
    return windows

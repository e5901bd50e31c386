"""Episode budget clocks: wall-clock, or a deterministic clock charged by the work an episode did.

A stage's time limit, the agent's elapsed-time reminders, the min-submit rule and the statuses
(`agent_timeout`, ...) read one clock, named by the config (`budget_clock`):

* "wall": seconds on this machine's monotonic clock, minus model-API retry time (PaperBench's
  rule). Right on a dedicated pod; on a shared box it measures machine load.
* "tokens": a deterministic clock. Each model call is charged for its prefill tokens not served
  from the episode's prefix (see `uncached_prefill`) and its generated tokens, at configurable
  seconds per token; each tool call by the sandbox's CPU time (cgroup `cpu.stat` in docker,
  the command's rusage in the local backend) or, when that is unavailable or `tool_cost` is
  "table", by a fixed per-tool cost. The same episode is cut at the same action on any machine
  at any load (bit for bit with the table; within CPU-time noise with "cpu").

`EpisodeClock` runs both clocks side by side, so every trajectory records its wall time and its
token-clock time (a pod run can calibrate the rates); the configured one binds. `snapshot()` /
`restore()` carry a clock across an episode checkpoint. No JAX here: the rollout fleet imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

CLOCKS = ("wall", "tokens")
TOOL_COSTS = ("cpu", "table")


class BudgetClock(Protocol):
  """What the scaffold needs of a clock (tests may pass any object with these methods)."""

  name: str

  def elapsed(self) -> float: ...

  def charge_model(self, prompt_tokens: int, uncached_tokens: int, completion_tokens: int,
                   retry_s: float = 0.0) -> None: ...

  def charge_tool(self, name: str, cpu_s: float | None = None) -> None: ...

  def exclude(self, seconds: float) -> None: ...

  def snapshot(self) -> dict[str, Any]: ...

  def restore(self, state: Mapping[str, Any]) -> None: ...


def parse_costs(text: str) -> dict[str, float]:
  """'bash=1.0,python=1.0,default=0.5' -> {tool: seconds}; a bad entry names itself."""
  out: dict[str, float] = {}
  for item in (p.strip() for p in (text or "").split(",")):
    if not item:
      continue
    key, sep, value = item.partition("=")
    try:
      if not sep or not key.strip():
        raise ValueError
      out[key.strip()] = float(value)
    except ValueError:
      raise ValueError(f"tool cost entry {item!r} must be NAME=SECONDS, e.g. "
                       "'bash=1.0,default=0.5'") from None
    if out[key.strip()] < 0:
      raise ValueError(f"tool cost entry {item!r} is negative; costs are seconds >= 0")
  return out


@dataclasses.dataclass(frozen=True)
class TokenRates:
  """The token clock's rates: seconds per uncached prefill token and per generated token; tool
  calls by CPU time ("cpu", the table when unmeasured) or always by the table ("table")."""

  prefill_s_per_token: float = 0.0005
  decode_s_per_token: float = 0.02
  tool_cost: str = "cpu"
  tool_costs: str = "default=1.0"    # NAME=SECONDS,...; `default` covers unlisted tools.

  def __post_init__(self) -> None:
    if self.tool_cost not in TOOL_COSTS:
      raise ValueError(f"tool_cost {self.tool_cost!r} must be one of {TOOL_COSTS}")
    if self.prefill_s_per_token < 0 or self.decode_s_per_token < 0:
      raise ValueError("prefill_s_per_token and decode_s_per_token must be >= 0, got "
                       f"{self.prefill_s_per_token}, {self.decode_s_per_token}")
    parse_costs(self.tool_costs)

  def table_cost(self, tool: str) -> float:
    costs = parse_costs(self.tool_costs)
    return costs.get(tool, costs.get("default", 0.0))


class WallClock:
  """Seconds since the start on `now` (a monotonic clock; tests pass a fake), less model-API
  retry time."""

  name = "wall"

  def __init__(self, now: Callable[[], float] = time.monotonic):
    self._now = now
    self._start = now()
    self._offset = 0.0  # Wall time of the episode before a restore.
    self.retry_s = 0.0

  def now(self) -> float:
    """The time source's reading (per-call wall times are measured on it)."""
    return self._now()

  def total(self) -> float:
    """Wall seconds including retry time."""
    return self._offset + self._now() - self._start

  def elapsed(self) -> float:
    return self.total() - self.retry_s

  def charge_model(self, prompt_tokens: int, uncached_tokens: int, completion_tokens: int,
                   retry_s: float = 0.0) -> None:
    del prompt_tokens, uncached_tokens, completion_tokens
    self.retry_s += max(0.0, float(retry_s))

  def charge_tool(self, name: str, cpu_s: float | None = None) -> None:
    del name, cpu_s  # Wall time passes by itself.

  def exclude(self, seconds: float) -> None:
    """Wall time that is not the agent's (episode checkpoints): counted like retry time."""
    self.retry_s += max(0.0, float(seconds))

  def snapshot(self) -> dict[str, Any]:
    return {"clock": self.name, "total_s": self.total(), "retry_s": self.retry_s}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a snapshot: the time the episode was down does not count."""
    self._offset, self._start = float(state["total_s"]), self._now()
    self.retry_s = float(state.get("retry_s", 0.0))


class TokenClock:
  """The deterministic clock: elapsed = prefill * rate + generated * rate + tool costs."""

  name = "tokens"

  def __init__(self, rates: TokenRates | None = None):
    self.rates = rates or TokenRates()
    self._costs = parse_costs(self.rates.tool_costs)
    self.prefill_tokens = self.decode_tokens = self.prompt_tokens = 0
    self.model_calls = self.tool_calls = self.tool_calls_cpu = 0
    self.tool_s = 0.0

  def elapsed(self) -> float:
    r = self.rates
    return (self.prefill_tokens * r.prefill_s_per_token
            + self.decode_tokens * r.decode_s_per_token + self.tool_s)

  def charge_model(self, prompt_tokens: int, uncached_tokens: int, completion_tokens: int,
                   retry_s: float = 0.0) -> None:
    del retry_s
    self.model_calls += 1
    self.prompt_tokens += int(prompt_tokens)
    self.prefill_tokens += max(0, int(uncached_tokens))
    self.decode_tokens += max(0, int(completion_tokens))

  def charge_tool(self, name: str, cpu_s: float | None = None) -> None:
    self.tool_calls += 1
    if self.rates.tool_cost == "cpu" and cpu_s is not None:
      self.tool_calls_cpu += 1
      self.tool_s += max(0.0, float(cpu_s))
    else:
      self.tool_s += self._costs.get(name, self._costs.get("default", 0.0))

  def exclude(self, seconds: float) -> None:
    del seconds  # Charged by tokens and tools only.

  def snapshot(self) -> dict[str, Any]:
    return {"clock": self.name, "elapsed_s": self.elapsed(),
            "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens,
            "prompt_tokens": self.prompt_tokens, "model_calls": self.model_calls,
            "tool_calls": self.tool_calls, "tool_calls_cpu": self.tool_calls_cpu,
            "tool_s": self.tool_s, "rates": dataclasses.asdict(self.rates)}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a snapshot, with the rates the episode started under."""
    if state.get("rates"):
      self.rates = TokenRates(**state["rates"])
      self._costs = parse_costs(self.rates.tool_costs)
    for key in ("prefill_tokens", "decode_tokens", "prompt_tokens", "model_calls", "tool_calls",
                "tool_calls_cpu"):
      setattr(self, key, int(state.get(key, 0)))
    self.tool_s = float(state.get("tool_s", 0.0))


class EpisodeClock:
  """Both clocks, charged together; `binding` ("wall" | "tokens") is the one the limits read."""

  def __init__(self, binding: str = "wall", rates: TokenRates | None = None,
               now: Callable[[], float] = time.monotonic):
    if binding not in CLOCKS:
      raise ValueError(f"budget clock {binding!r} must be one of {CLOCKS}")
    self.binding = binding
    self.wall = WallClock(now)
    self.tokens = TokenClock(rates)

  @property
  def name(self) -> str:
    return self.binding

  def now(self) -> float:
    """The wall clock's time source (per-call wall times are measured on it)."""
    return self.wall.now()

  def elapsed(self) -> float:
    """Seconds of budget used, on the binding clock."""
    return (self.wall if self.binding == "wall" else self.tokens).elapsed()

  def charge_model(self, prompt_tokens: int, uncached_tokens: int, completion_tokens: int,
                   retry_s: float = 0.0) -> None:
    for c in (self.wall, self.tokens):
      c.charge_model(prompt_tokens, uncached_tokens, completion_tokens, retry_s)

  def charge_tool(self, name: str, cpu_s: float | None = None) -> None:
    for c in (self.wall, self.tokens):
      c.charge_tool(name, cpu_s)

  def exclude(self, seconds: float) -> None:
    for c in (self.wall, self.tokens):
      c.exclude(seconds)

  def snapshot(self) -> dict[str, Any]:
    """JSON-able state: the binding clock's name, its elapsed budget and both clocks."""
    return {"clock": self.binding, "budget_s": self.elapsed(), "wall": self.wall.snapshot(),
            "tokens": self.tokens.snapshot()}

  def restore(self, state: Mapping[str, Any]) -> None:
    if state.get("clock") not in CLOCKS:
      raise ValueError(f"clock snapshot names clock {state.get('clock')!r}; expected one of "
                       f"{CLOCKS}")
    self.binding = str(state["clock"])
    self.wall.restore(state["wall"])
    self.tokens.restore(state["tokens"])


def uncached_prefill(prompt_tokens: int, reused_tokens: int) -> int:
  """Prefill tokens a call is charged for: its prompt less the tokens it shares with the
  episode's previous call (prompt + completion) or, after the window moved, the fixed prefix.

  This is the prefix cache an idle server would give one episode. The server's own count
  (`usage.prompt_tokens_details.cached_tokens`) is recorded but not charged: its hits depend on
  evictions, weight swaps and which group member arrived first, i.e. on load and timing.
  """
  return max(0, int(prompt_tokens) - max(0, int(reused_tokens)))


def request_seed(task_id: str, group: str, member: int, turn: int) -> int:
  """The sampling seed of one model call: a stable hash of (task, group, member, turn) in
  [0, 2**31) (sha256, not Python's salted hash()), so a group is reproducible run to run."""
  key = f"{task_id}\x1f{group}\x1f{int(member)}\x1f{int(turn)}".encode()
  return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % (2**31)

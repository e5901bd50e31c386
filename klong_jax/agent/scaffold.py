"""The agent loop (PaperBench basic agent + KLong fixes) against any OpenAI-compatible endpoint.

Fixed prefix = system + task + paper-reading messages (kept in every model call, and the same in
every RL stage: the time budget is stated after it); the rest of the history is windowed by the
context policy the trainer's splitter replays (data/context.py), measured in real tokens with the
policy's chat format, while the FULL message log is kept for the trajectory. Sampled assistant
turns go back to the server as their exact `token_ids`. Without a chat format (a foreign endpoint
whose tokenizer we lack) the history is trimmed oldest-first by a chars/token estimate. Time
reminders every N steps; step/token/time budgets, time on the clock the config names
(agent/budget.py: wall, or the deterministic token clock; both are recorded); malformed tool
calls (bad arguments, unknown tools, or tool-call text the server could not parse:
`tool_call_error`) are answered with an error;
"no early end": an early submit is refused (KLong) until a configurable share of the time budget
is used.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from klong_jax.agent import budget as budget_lib
from klong_jax.agent import client as client_lib
from klong_jax.agent.tools import REGISTRY, ToolRegistry, malformed_call_message
from klong_jax.data.context import ContextPolicy
from klong_jax.sandbox.base import SUBMISSION, Sandbox

SYSTEM_PROMPT = (
    "You are a research agent reproducing a machine-learning paper in a sandbox. Use the tools to "
    "read the paper, write code and run experiments. Your submission is the git repository in "
    f"{SUBMISSION}; it must contain reproduce.sh, which is re-run in a fresh container to grade "
    "you. You have no internet access. Work until the time limit; do not stop early.")
CONTINUE_MESSAGE = (
    "Please continue working on the task with your best judgement. If you believe you are done, "
    "double-check and refine your work, and make sure reproduce.sh runs end to end.")


@dataclasses.dataclass
class AgentConfig:
  """Budgets and knobs of one episode."""

  model: str = "policy"
  max_steps: int = 100
  max_total_tokens: int = 1 << 30      # Completion tokens over the episode.
  time_limit_s: float = 3600.0         # Agent budget (excludes API retry time, as PaperBench).
  reminder_every: int = 5
  context_tokens: int = 32768          # Model context = the trainer's chunk length (max_len).
  context_overlap: int = 0             # History tokens a new window repeats (= data.overlap).
  max_completion_tokens: int = 2048
  tool_timeout_s: float = 600.0
  temperature: float = 1.0
  return_routing: bool = False         # Routing replay: record the server's MoE expert ids.
  no_early_end: bool = True
  min_submit_fraction: float = 0.0     # Share of time_limit_s before submit is accepted.
  max_submit_refusals: int = 1
  request_retries: int = 3
  retry_backoff_s: float = 1.0
  chars_per_token: float = 3.5         # Token estimate when the server sends no usage.
  # The clock of time_limit_s, the reminders and min_submit_fraction: "wall" | "tokens"
  # (agent/budget.py); `token_rates` are the token clock's (recorded either way).
  budget_clock: str = "wall"
  token_rates: budget_lib.TokenRates = dataclasses.field(default_factory=budget_lib.TokenRates)
  # (task, group, member): each model call sends seed request_seed(task, group, member, turn);
  # None: the server draws one.
  seed_key: tuple[str, str, int] | None = None


@dataclasses.dataclass
class EpisodeResult:
  """What the agent did: full message log, prefix length, status, and counters."""

  messages: list[dict[str, Any]]
  prefix_messages: int
  status: str                  # completed | agent_timeout | step_limit | wall_timeout
  end_reason: str              # submitted | max_steps | max_tokens | time_limit | wall_timeout
  steps: int
  completion_tokens: int
  wall_s: float
  retry_s: float
  trims: int
  malformed_calls: int
  budget_s: float = 0.0        # Time used on the binding clock (`budget_clock`).
  budget_clock: str = "wall"
  clock: dict[str, Any] = dataclasses.field(default_factory=dict)  # EpisodeClock.snapshot().


@dataclasses.dataclass
class EpisodeState:
  """Everything run_episode keeps between steps, taken at a step boundary: enough to resume an
  interrupted episode (rollout/episode_ckpt.py persists it with the sandbox workspace)."""

  messages: list[dict[str, Any]]   # The full log, prefix included, with each turn's `klong`.
  prefix_messages: int
  steps: int                       # Actions completed (the resumed episode goes on at steps+1).
  completion_tokens: int
  trims: int
  malformed_calls: int
  refusals: int                    # Early submits refused so far (no early end).
  retry_s: float                   # Server retry time so far (not agent time).
  context_start: int               # Untrimmed path: context = prefix + messages[context_start:].
  window_first: int                # Context policy path: the open window's first message.
  clock: dict[str, Any]            # The budget clock's snapshot (clock_snapshot()).

  def to_json(self) -> dict[str, Any]:
    """Its fields as JSON-ready values (shallow: the message dicts are shared, not copied)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> EpisodeState:
    names = {f.name for f in dataclasses.fields(cls)}
    if set(d) != names:
      raise ValueError(f"episode state fields {sorted(d)} differ from {sorted(names)}: a "
                       "checkpoint of another klong-jax version; delete it to rerun the episode")
    return cls(**d)


def clock_snapshot(clock: budget_lib.BudgetClock | float) -> dict[str, Any]:
  """The budget clock as persisted in a checkpoint: its `snapshot()` (both clocks); a number is
  a wall clock at that many agent seconds (tests, hand-made states)."""
  if isinstance(clock, (int, float)):
    c = budget_lib.EpisodeClock("wall", now=lambda: 0.0)
    c.wall.restore({"total_s": float(clock)})
    return c.snapshot()
  return clock.snapshot()


def clock_elapsed(snapshot: dict[str, Any]) -> float:
  """Wall-clock agent seconds a `clock_snapshot` recorded (retries excluded): what the outer
  wall guard and the checkpoint interval count, whichever clock binds the budget."""
  wall = snapshot["wall"]
  return float(wall["total_s"]) - float(wall.get("retry_s", 0.0))


def format_progress_time(seconds: float) -> str:
  """h:mm:ss with space-padded hours, like PaperBench's reminders."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:2d}:{m:02d}:{s:02d}"


def initial_messages(task_prompt: str, paper_md: str, addendum_md: str = "",
                     time_limit_s: float | None = None) -> list[dict[str, Any]]:
  """The fixed prefix: system, task instructions, and the paper (mandatory reading, KLong).

  It holds nothing that changes between RL stages (the time budget is `budget_message`), so
  every stage and the trainer's chunks share one prefix. `time_limit_s` is accepted for old
  callers and ignored.
  """
  del time_limit_s
  task = (f"{task_prompt.strip()}\n\nThe paper is at /workspace/paper/paper.md (addendum: "
          f"/workspace/paper/addendum.md). Put your code in {SUBMISSION} with a reproduce.sh.")
  paper = f"Read the paper first.\n\n<paper>\n{paper_md}\n</paper>"
  if addendum_md.strip():
    paper += f"\n\n<addendum>\n{addendum_md}\n</addendum>"
  return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task},
          {"role": "user", "content": paper}]


def budget_message(time_limit_s: float) -> dict[str, Any]:
  """The first history message: this episode's time budget (stage-dependent, after the prefix)."""
  return {"role": "user", "content": (
      f"Your time budget is {format_progress_time(time_limit_s)} (h:mm:ss). Work step by step; "
      "the task ends at the time limit.")}


def estimate_tokens(messages: list[dict[str, Any]], chars_per_token: float) -> int:
  """A cheap token estimate of a message list (JSON length / chars_per_token)."""
  n = 0
  for m in messages:
    ids = (m.get("klong") or {}).get("token_ids")
    if ids:
      n += len(ids) + 8
    else:
      body = {k: v for k, v in m.items() if k != "klong"}
      n += int(len(json.dumps(body, ensure_ascii=False)) / chars_per_token) + 8
  return n


def _units(history: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
  """Groups history into droppable units: an assistant turn with its tool results, or one msg."""
  units: list[list[dict[str, Any]]] = []
  for m in history:
    if m.get("role") == "tool" and units and units[-1][0].get("role") == "assistant":
      units[-1].append(m)
    else:
      units.append([m])
  return units


def trim_context(messages: list[dict[str, Any]], prefix: int, budget: int,
                 chars_per_token: float, drop_fraction: float = 0.0) -> tuple[list, int]:
  """Drops the oldest history units (never the prefix, never the last unit) to fit `budget`.

  With drop_fraction > 0 at least that share of the units is dropped (server said too long).
  Returns (messages, number of units dropped). Tool results never lose their assistant call.
  """
  head, units = messages[:prefix], _units(messages[prefix:])
  dropped = 0
  must = int(len(units) * drop_fraction)
  while len(units) > 1 and (dropped < must or estimate_tokens(
      head + [m for u in units for m in u], chars_per_token) > budget):
    units.pop(0)
    dropped += 1
  return head + [m for u in units for m in u], dropped


class _Window:
  """The live side of the context policy: real token starts of the history (the chat format's
  `render(...).turn_starts`, resumed from its cached prefix each step), the open window."""

  def __init__(self, fmt: Any, prefix: list[dict[str, Any]], tools: list[dict[str, Any]],
               cfg: AgentConfig):
    self.fmt, self.tools, self.n_prefix = fmt, tools, len(prefix)
    self.policy = ContextPolicy(cfg.context_tokens, cfg.context_overlap,
                                cfg.max_completion_tokens)
    self.prefix_len = len(fmt.render(prefix, tools).tokens)
    self.policy.check_prefix(self.prefix_len, "the task's fixed prefix (system + task + paper)")
    self.first = 0

  def open(self, messages: list[dict[str, Any]]) -> int:
    """First history message the next action sees (the splitter replays the same choice): a
    window never starts on a tool result nor on a message whose role token the previous turn
    generated (`Rendered.joined`, GLM)."""
    r = self.fmt.render(messages, self.tools)
    p = r.turn_starts[self.n_prefix] if len(messages) > self.n_prefix else len(r.tokens)
    starts = [s - p for s in r.turn_starts[self.n_prefix:]] + [len(r.tokens) - p]
    joined = set(r.joined)
    can_start = [m.get("role") != "tool" and i not in joined
                 for i, m in enumerate(messages) if i >= self.n_prefix]
    self.first = self.policy.window_start(p, starts, can_start, self.first, len(can_start))
    return self.first


def _wire(m: dict[str, Any]) -> dict[str, Any]:
  """The message as sent: bookkeeping keys removed, sampled turns as their exact token ids."""
  out = {k: v for k, v in m.items() if k not in ("klong", "meta")}  # our bookkeeping keys
  ids = (m.get("klong") or {}).get("token_ids") if m.get("role") == "assistant" else None
  if ids:
    out["token_ids"] = list(ids)
  return out


def _routing_from(context: list[dict[str, Any]]) -> int:
  """First prompt token whose routing the next request must return: the last sampled turn's
  record covers its prompt and its sampled tokens but the last one (data/routing.next_start)."""
  for m in reversed(context):
    k = m.get("klong") or {}
    rec = k.get("routed_experts") if m.get("role") == "assistant" else None
    if isinstance(rec, dict) and "prompt_len" in rec:
      return max(0, int(rec["prompt_len"]) + len(k.get("token_ids") or ()) - 1)
  return 0


def run_episode(client: Any, sandbox: Sandbox, prefix: list[dict[str, Any]], cfg: AgentConfig,
                tools: list[dict[str, Any]] | None = None,
                clock: budget_lib.BudgetClock | Callable[[], float] | None = None,
                workdir: str = SUBMISSION,
                should_stop: Callable[[], bool] | None = None,
                state: dict[str, Any] | None = None, fmt: Any = None,
                on_request: Callable[[list[dict[str, Any]]], None] | None = None,
                registry: ToolRegistry | None = None, parser: Any = None,
                resume: EpisodeState | None = None,
                on_step: Callable[[EpisodeState], None] | None = None) -> EpisodeResult:
  """Runs the agent until submit or a budget runs out; server failures raise InfraError.

  `fmt` (a data.chat.ChatFormat of the served model) turns on the shared context policy;
  `should_stop` (the worker's outer wall guard) ends the episode as "wall_timeout"; `state`
  receives a live reference to the message log (kept if the episode raises); `on_request` sees
  each request's messages (tests). Tool calls run through `registry` (default: the agent's
  `tools.REGISTRY`), whose schemas are offered unless `tools` is given. `parser` (the model
  family's data/tool_parsers parser) parses tool-call text an endpoint left in the content.
  `resume` continues an interrupted episode from its state (its prefix must equal `prefix`; the
  agent time already used counts against the budget); `on_step` receives the state after every
  completed action (the worker's episode checkpoints, rollout/episode_ckpt.py).
  `clock`: the budget clock (default: an EpisodeClock of `cfg.budget_clock`); a bare callable is
  taken as the wall clock's time source (tests); `state["clock"]` is the live clock.
  """
  registry = REGISTRY if registry is None else registry
  tools = registry.schemas if tools is None else tools
  messages = [dict(m) for m in (prefix if resume is None else resume.messages)]
  if state is not None:
    state["messages"] = messages
  n_prefix = len(prefix) if resume is None else resume.prefix_messages
  if resume is not None and [_wire(m) for m in messages[:n_prefix]] != [_wire(m) for m in prefix]:
    raise ValueError("the resumed episode's fixed prefix differs from this task's: its "
                     "checkpoint belongs to another task or paper version; delete it")
  window = _Window(fmt, messages[:n_prefix], tools, cfg) if fmt is not None else None
  context = list(messages)
  now: Callable[[], float] = time.monotonic
  if clock is None or callable(clock) and not hasattr(clock, "elapsed"):
    now = clock or time.monotonic
    clock = budget_lib.EpisodeClock(cfg.budget_clock, cfg.token_rates, now=now)
  if state is not None:
    state["clock"] = clock
  tick: Callable[[], float] = getattr(clock, "now", now)  # the wall clock's time source
  start = now()
  retry_s = 0.0
  steps = tokens = trims = malformed = refusals = 0
  if resume is not None:
    steps, tokens, trims = resume.steps, resume.completion_tokens, resume.trims
    malformed, refusals, retry_s = resume.malformed_calls, resume.refusals, resume.retry_s
    context = messages[:n_prefix] + messages[resume.context_start:]
    if window is not None:
      window.first = resume.window_first
    clock.restore(resume.clock)  # elapsed() goes on from the checkpoint; downtime not counted.
    start -= float(resume.clock["wall"]["total_s"])
  reported = steps
  end_reason = ""
  last_call: tuple[int, int] | None = None  # (window start or trims, prompt + completion tokens)

  def elapsed() -> float:
    return clock.elapsed()

  def add(m: dict[str, Any]) -> None:
    messages.append(m)
    context.append(m)

  if resume is None:
    add(budget_message(cfg.time_limit_s))
  while True:
    if on_step is not None and steps > reported:
      reported, t0 = steps, now()
      on_step(EpisodeState(
          messages=messages, prefix_messages=n_prefix, steps=steps, completion_tokens=tokens,
          trims=trims, malformed_calls=malformed, refusals=refusals, retry_s=retry_s,
          context_start=len(messages) - (len(context) - n_prefix),
          window_first=window.first if window is not None else 0,
          clock=clock_snapshot(clock)))
      dt = now() - t0  # Checkpointing is infra time, like retries: not the agent's.
      retry_s += dt
      clock.exclude(dt)
    if should_stop is not None and should_stop():
      end_reason = "wall_timeout"
    elif steps >= cfg.max_steps:
      end_reason = "max_steps"
    elif tokens >= cfg.max_total_tokens:
      end_reason = "max_tokens"
    elif elapsed() >= cfg.time_limit_s:
      end_reason = "time_limit"
    if end_reason:
      break
    steps += 1
    if cfg.reminder_every and steps % cfg.reminder_every == 0:
      add({"role": "user", "content": (
          f"Info: {format_progress_time(elapsed())} time elapsed out of "
          f"{format_progress_time(cfg.time_limit_s)}. The task only ends at the time limit; keep "
          "improving your submission and commit your work with git regularly.")})
    budget = cfg.context_tokens - cfg.max_completion_tokens
    if window is not None:
      first = window.open(messages)
      trims = first
      context = messages[:n_prefix] + messages[n_prefix + first:]
    else:
      context, dropped = trim_context(context, n_prefix, budget, cfg.chars_per_token)
      trims += dropped
    seed = budget_lib.request_seed(*cfg.seed_key, steps) if cfg.seed_key else None
    for attempt in range(3):
      t0 = now()
      try:
        wire = [_wire(m) for m in context]
        if on_request is not None:
          on_request(wire)
        reply, info = client_lib.chat(
            client, cfg.model, wire, tools, cfg.max_completion_tokens,
            cfg.temperature, retries=cfg.request_retries, backoff_s=cfg.retry_backoff_s,
            routing_from=_routing_from(context) if cfg.return_routing else None, parser=parser,
            seed=seed)
        call_retry_s = max(0.0, (now() - t0) - info["latency_s"])
        retry_s += call_retry_s
        break
      except client_lib.ContextLengthError:
        if window is not None:  # Measured in the server's own tokens: the configs disagree.
          raise client_lib.InfraError(
              f"the server rejected a {cfg.context_tokens}-token context as too long; its "
              "max_len must be >= the agent's context_tokens") from None
        if attempt == 2:
          raise client_lib.InfraError("context still too long after trimming") from None
        context, dropped = trim_context(context, n_prefix, budget, cfg.chars_per_token, 0.3)
        trims += dropped
    usage = info.get("usage") or {}
    completion = int(usage.get("completion_tokens") or len((reply.get("klong") or {}).get(
        "token_ids") or []) or estimate_tokens([reply], cfg.chars_per_token))
    tokens += completion
    prompt = int(usage.get("prompt_tokens") or estimate_tokens(context, cfg.chars_per_token))
    # The episode's own prefix cache: an extended context reuses the last call's tokens, a moved
    # window only the fixed prefix (budget.uncached_prefill).
    reused = 0
    if last_call is not None:
      reused = (last_call[1] if last_call[0] == trims
                else window.prefix_len if window is not None else 0)
    prefill = budget_lib.uncached_prefill(prompt, reused)
    clock.charge_model(prompt, prefill, completion, retry_s=call_retry_s)
    last_call = (trims, prompt + completion)
    parse_error = reply.pop("tool_call_error", None)
    # Per call, what the token clock charged and what the call took in wall time (its latency,
    # retries excluded): agent/calibrate.py fits the clock's rates to these.
    reply["meta"] = {"step": steps, "t": round(elapsed(), 3), "seed": seed,
                     "finish_reason": info.get("finish_reason"),
                     "prompt_tokens": prompt, "prefill_tokens": prefill,
                     "completion_tokens": completion,
                     "latency_s": round(float(info.get("latency_s", 0.0)), 4)}
    if parse_error:
      reply["meta"]["tool_call_error"] = parse_error
    add(reply)
    calls = reply.get("tool_calls") or []
    if not calls:
      malformed += int(bool(parse_error))
      add({"role": "user", "content": malformed_call_message(parse_error) if parse_error
           else CONTINUE_MESSAGE})
      continue
    submitted = False
    for call in calls:
      fn = call.get("function") or {}
      name = fn.get("name") or ""
      t_tool = tick()
      out = registry.execute(sandbox, name, fn.get("arguments"), cfg.tool_timeout_s,
                             workdir=workdir)
      tool_meta = {"wall_s": round(tick() - t_tool, 4), "cpu_s": out.cpu_s}
      clock.charge_tool(name, out.cpu_s)
      content = out.content
      malformed += int(out.error)
      if out.submitted:
        early = elapsed() < cfg.min_submit_fraction * cfg.time_limit_s
        if cfg.no_early_end and early and refusals < cfg.max_submit_refusals:
          refusals += 1
          left = cfg.time_limit_s - elapsed()
          content = (f"Submission refused: {format_progress_time(left)} of your time budget is "
                     "left. Keep improving and verifying your work; submit again later.")
        else:
          submitted = True
      add({"role": "tool", "tool_call_id": call.get("id", ""), "name": name, "content": content,
           "meta": tool_meta})
    if submitted:
      end_reason = "submitted"
      break
  return EpisodeResult(messages=messages, prefix_messages=n_prefix,
                       status=END_STATUS[end_reason], end_reason=end_reason, steps=steps,
                       completion_tokens=tokens, wall_s=now() - start, retry_s=retry_s,
                       trims=trims, malformed_calls=malformed, budget_s=clock.elapsed(),
                       budget_clock=getattr(clock, "name", cfg.budget_clock),
                       clock=clock.snapshot())


# How an episode ended -> trajectory status: the time limit (what progressive RL stages bind) is
# told apart from the step/token budgets.
END_STATUS = {"submitted": "completed", "wall_timeout": "wall_timeout",
              "time_limit": "agent_timeout", "max_steps": "step_limit", "max_tokens": "step_limit"}

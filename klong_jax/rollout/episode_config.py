"""The one episode config: budgets, sampling, context policy and sandbox of one agent episode.

RL rollouts (`rollout.worker`), held-out eval pairs (`eval.pair`) and teacher distillation
(`factory.distill`) all run an episode through the same scaffold and sandbox; they share this
dataclass. Their defaults differ on purpose and are written once, in `ROLE_DEFAULTS`: RL rollouts
are short and step-capped, an eval is PaperBench-shaped (hours, the clock is the limit),
distillation runs the scripted teacher briefly. `define_flags` / `from_flags` give every entry
point the same command-line flags, sandbox limits included (`--sandbox_limits=mem_bytes=...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from klong_jax import config_util
from klong_jax.agent import budget as budget_lib
from klong_jax.agent import scaffold
from klong_jax.sandbox import base as sandbox_lib

Limits = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
  """What one agent episode needs (picklable, hashable: limits are (name, value) pairs)."""

  backend: str = "docker"              # Sandbox backend: docker | local.
  model: str = "policy"                # Model name sent to the server.
  max_steps: int = 50                  # Agent step budget.
  # Agent time budget (RL: used when control.json sets none; eval: the task budget).
  time_limit_s: float = 600.0
  wall_factor: float = 1.5             # Outer guard = time_limit_s * wall_factor + wall_slack_s.
  wall_slack_s: float = 60.0
  # The clock of time_limit_s (stage limits, reminders, min-submit, statuses): "wall", or
  # "tokens", deterministic (agent/budget.py): uncached prefill tokens x prefill_s_per_token +
  # generated tokens x decode_s_per_token + tool calls by sandbox CPU time ("cpu") or the
  # tool_costs table ("table", or when CPU time is unmeasured). Both are recorded.
  budget_clock: str = "wall"
  prefill_s_per_token: float = 0.0005
  decode_s_per_token: float = 0.02
  tool_cost: str = "cpu"
  tool_costs: str = "default=1.0"      # Per-tool seconds NAME=S,...; `default`: unlisted tools.
  # Token clock: the outer wall guard is a hang guard, hang_factor x the wall clock's guard.
  hang_factor: float = 4.0
  tool_timeout_s: float = 120.0        # Per tool call (capped at the time limit).
  reproduce_timeout_s: float = 300.0   # reproduce.sh in a fresh sandbox; 0 = the task's value.
  # The context policy (data/context.py) shared with the trainer's splitter: context_tokens =
  # data.max_len, context_overlap = data.overlap, max_completion_tokens = data.completion_tokens.
  context_tokens: int = 32768
  context_overlap: int = 0
  max_completion_tokens: int = 2048
  # Sampling temperature; the RL trainer must use the same one (rl.temperature), since the
  # recorded logprobs are log softmax(logits / T) (inference/sampling.py, "tempered").
  temperature: float = 1.0
  # Routing replay (R3): ask the server for each token's MoE expert ids and keep them in the
  # trajectory's `routing` (schema 2), not its messages. Harmless against servers without it.
  routing_replay: bool = True
  request_retries: int = 3             # Per model call (client backoff), before an infra error.
  limits: Limits = ()                  # sandbox.base.Limits overrides, e.g. (("pids", 128),).

  def __post_init__(self) -> None:
    if self.budget_clock not in budget_lib.CLOCKS:
      raise ValueError(f"budget_clock {self.budget_clock!r} must be one of {budget_lib.CLOCKS}")
    self.token_rates()  # Bad rates or cost tables fail here, naming the field.
    if isinstance(self.limits, Mapping):
      object.__setattr__(self, "limits", tuple(sorted(self.limits.items())))
    sandbox_lib.Limits.from_kwargs(**dict(self.limits))  # Unknown limit names fail here.

  def replace(self, **changes: Any) -> EpisodeConfig:
    return dataclasses.replace(self, **changes)

  def token_rates(self) -> budget_lib.TokenRates:
    """The token clock's rates."""
    return budget_lib.TokenRates(self.prefill_s_per_token, self.decode_s_per_token,
                                 self.tool_cost, self.tool_costs)

  def agent_config(self, time_limit_s: float | None = None,
                   seed_key: tuple[str, str, int] | None = None) -> scaffold.AgentConfig:
    """The scaffold's AgentConfig for an episode limited to `time_limit_s` (default: ours);
    `seed_key` (task, group, member) seeds its model calls (budget.request_seed)."""
    t = self.time_limit_s if time_limit_s is None else time_limit_s
    return scaffold.AgentConfig(
        budget_clock=self.budget_clock, token_rates=self.token_rates(), seed_key=seed_key,
        model=self.model, max_steps=self.max_steps, time_limit_s=t,
        tool_timeout_s=min(self.tool_timeout_s, t), context_tokens=self.context_tokens,
        context_overlap=self.context_overlap, max_completion_tokens=self.max_completion_tokens,
        request_retries=self.request_retries, temperature=self.temperature,
        return_routing=self.routing_replay)

  def wall_s(self, time_limit_s: float | None = None) -> float:
    """The outer wall-clock guard of an episode limited to `time_limit_s` (with the token
    clock a hang guard only, `hang_factor` times longer, so load does not cut episodes)."""
    t = self.time_limit_s if time_limit_s is None else time_limit_s
    guard = t * self.wall_factor + self.wall_slack_s
    return guard * self.hang_factor if self.budget_clock == "tokens" else guard

  def reproduce_timeout(self, task: Any = None) -> float:
    """reproduce.sh limit: ours, or (when 0) the task's config value, else 3600 s."""
    if self.reproduce_timeout_s:
      return self.reproduce_timeout_s
    config = getattr(task, "config", None) or {}
    return float(config.get("reproduce_timeout_s", 3600.0))

  def sandbox(self) -> sandbox_lib.Sandbox:
    return sandbox_lib.make_sandbox(self.backend, **dict(self.limits))


# Each role's defaults (one table; every other field keeps the EpisodeConfig default).
ROLE_DEFAULTS: dict[str, EpisodeConfig] = {
    "rl": EpisodeConfig(),
    # PaperBench-shaped: the time budget is the limit (12 h), tools may run long, reproduce.sh
    # gets the task's own limit.
    "eval": EpisodeConfig(max_steps=1_000_000, time_limit_s=12 * 3600.0, tool_timeout_s=600.0,
                          reproduce_timeout_s=0.0, routing_replay=False),
    "distill": EpisodeConfig(model="teacher", max_steps=12, time_limit_s=120.0,
                             reproduce_timeout_s=60.0, routing_replay=False),
}

_HELP = {
    "backend": "Sandbox backend (docker|local).",
    "model": "Model name sent to the server.",
    "max_steps": "Agent step budget.",
    "time_limit_s": "Agent time budget (RL: when control.json sets none).",
    "wall_factor": "Outer wall guard = time_limit_s * wall_factor + wall_slack_s.",
    "wall_slack_s": "Outer wall guard slack (seconds).",
    "budget_clock": "Clock of the time budget (stage limits, reminders, statuses): wall | tokens "
                    "(deterministic: token counts and sandbox CPU time; agent/budget.py).",
    "prefill_s_per_token": "Token clock: seconds per prefill token not reused from the "
                           "episode's previous call.",
    "decode_s_per_token": "Token clock: seconds per generated token.",
    "tool_cost": "Token clock: tool calls cost their sandbox CPU time (cpu) or the tool_costs "
                 "table (table; also when CPU time is unmeasured).",
    "tool_costs": "Token clock: per-tool seconds NAME=S,... ('default' for the rest).",
    "hang_factor": "Token clock: the outer wall guard is this many times the wall clock's.",
    "tool_timeout_s": "Per tool call time limit (capped at the time budget).",
    "reproduce_timeout_s": "reproduce.sh limit; 0 = the task's config value.",
    "context_tokens": "Model context = the trainer's data.max_len (history is windowed to fit).",
    "context_overlap": "History tokens a new context window repeats (= the trainer's "
                       "data.overlap).",
    "max_completion_tokens": "Completion tokens per call (= the trainer's data.completion_tokens).",
    "temperature": "Sampling temperature (= the RL trainer's rl.temperature; recorded in each "
                   "trajectory's metadata).",
    "routing_replay": "Ask the server for each token's MoE expert ids and keep them in the "
                      "trajectory (R3; RL rollouts only).",
    "request_retries": "Retries per model call before an infra error.",
}
FLAG_NAMES = tuple(_HELP) + ("sandbox_limits",)


def parse_limits(text: str) -> Limits:
  """'mem_bytes=2147483648,pids=512,cpus=2' -> sandbox limit pairs typed by sandbox.Limits."""
  fields = {f.name: f.default for f in dataclasses.fields(sandbox_lib.Limits)}
  out = []
  for key, value in config_util.parse_items(text, example="mem_bytes=1073741824,pids=256"):
    if key not in fields:
      raise config_util.ConfigKeyError(f"sandbox limit {key!r} unknown; valid: {sorted(fields)}")
    out.append((key, config_util.parse_value(value, fields[key], key)))
  return tuple(sorted(out))


def format_limits(limits: Limits | Mapping[str, Any]) -> str:
  """Inverse of parse_limits (for command lines)."""
  items = limits.items() if isinstance(limits, Mapping) else limits
  return ",".join(f"{k}={v}" for k, v in sorted(items))


def define_flags(role: str, flag_values: Any = None, exclude: tuple[str, ...] = ()) -> None:
  """absl flags for every EpisodeConfig field but `exclude`, defaulting to `ROLE_DEFAULTS[role]`.

  A flag already defined (an entry point that imports another) is left as it is.
  """
  from absl import flags  # noqa: PLC0415 - only entry points define flags

  fv = flags.FLAGS if flag_values is None else flag_values
  base = ROLE_DEFAULTS[role]
  for name, help_str in _HELP.items():
    if name in fv or name in exclude:
      continue
    default = getattr(base, name)
    if name == "backend":
      flags.DEFINE_enum(name, default, ["docker", "local"], help_str, flag_values=fv)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_str, flag_values=fv)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_str, flag_values=fv)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_str, flag_values=fv)
    else:
      flags.DEFINE_string(name, default, help_str, flag_values=fv)
  if "sandbox_limits" not in fv:
    flags.DEFINE_string("sandbox_limits", format_limits(base.limits),
                        "Sandbox limits k=v,... of sandbox.base.Limits (mem_bytes, cpus, pids, "
                        "workspace_bytes, tmp_bytes, network, image, ...); '' = the defaults.",
                        flag_values=fv)


def from_flags(role: str, flag_values: Any = None, **overrides: Any) -> EpisodeConfig:
  """The EpisodeConfig the command line gives (flags defined by `define_flags`)."""
  from absl import flags  # noqa: PLC0415

  fv = flags.FLAGS if flag_values is None else flag_values
  values = {name: fv[name].value for name in _HELP if name in fv}
  values["limits"] = parse_limits(fv["sandbox_limits"].value)
  return ROLE_DEFAULTS[role].replace(**{**values, **overrides})


def split_fields(role: str, fields: Mapping[str, Any]) -> tuple[dict[str, Any], EpisodeConfig]:
  """Flat role-config fields -> (the non-episode ones, the EpisodeConfig of the others)."""
  names = {f.name for f in dataclasses.fields(EpisodeConfig)}
  rest = {k: v for k, v in fields.items() if k not in names}
  base = rest.pop("episode", None) or ROLE_DEFAULTS[role]
  return rest, base.replace(**{k: v for k, v in fields.items() if k in names})


def from_mapping(role: str, values: Mapping[str, Any]) -> EpisodeConfig:
  """An EpisodeConfig from a config section (unknown keys fail naming the valid ones)."""
  names = {f.name for f in dataclasses.fields(EpisodeConfig)}
  bad = sorted(set(values) - names)
  if bad:
    raise config_util.ConfigKeyError(f"episode field(s) {bad} unknown; valid: {sorted(names)}")
  return ROLE_DEFAULTS[role].replace(**dict(values))

"""Messages -> Trajectory fields, using the sampler's exact token ids where the turn carries them.

Tokens, loss mask and message starts come from `ChatFormat.render` (the model's chat template,
rendered turn by turn); this module adds the sampled turns' logprobs, policy versions and routing.

An assistant message may hold `"klong": {"token_ids", "logprobs", "policy_version"}`, the ids the
sampler generated for that turn; they are used verbatim (never re-tokenized, DESIGN.md 4). Without
it (teacher data) the text is tokenized, with logprob 0 and policy version -1. A sampled turn
may also carry `"routed_experts"` (the server's recorded MoE routing of its prompt and sampled
tokens, data/routing.py): the trajectory then gets `routing` for routing replay. An assistant turn
whose `meta.finish_reason` is "length" (generation stopped at max_tokens: a cut, likely malformed
action) is recorded in `cut_turns`, so the RL trainer can leave it out of the loss. No JAX imports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klong_jax.data import routing as routing_lib
from klong_jax.data.chat import ChatFormat

log = logging.getLogger(__name__)


def _sampled(message: Mapping[str, Any], index: int) -> tuple[list[int], list[float], list[int]]:
  """The validated (ids, logprobs, versions) of a sampled assistant turn."""
  k = message["klong"]
  if not isinstance(k, Mapping) or "token_ids" not in k:
    raise ValueError(f"message {index}: 'klong' must be a dict with 'token_ids'")
  ids = [int(t) for t in k["token_ids"]]
  n = len(ids)
  lps = k.get("logprobs")
  lps = [0.0] * n if lps is None else [float(x) for x in lps]
  pv = k.get("policy_version", -1)
  pv = [int(pv)] * n if isinstance(pv, (int, np.integer)) else [int(v) for v in pv]
  if len(lps) != n or len(pv) != n:
    raise ValueError(f"message {index}: 'klong' has {n} token_ids but {len(lps)} logprobs and "
                     f"{len(pv)} policy versions; they must match one per token")
  return ids, lps, pv


def render_trajectory(messages: Sequence[Mapping[str, Any]], fmt: ChatFormat,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      prefix_messages: int = 0) -> dict[str, Any]:
  """Renders messages into Trajectory fields; the first `prefix_messages` form the fixed prefix.

  Returns tokens, loss_mask, logprobs, policy_version (numpy arrays), prefix_end (token index of
  message `prefix_messages`, or the length if all messages are prefix), turn_starts and routing
  ([n, moe_layers, k] int16, or None when no turn recorded any), `joined` (messages whose
  role token the previous assistant turn generated; windows never start there) and `cut_turns`
  (`length_cut_turns`).
  """
  if not 0 <= prefix_messages <= len(messages):
    raise ValueError(f"prefix_messages={prefix_messages} must be in [0, {len(messages)}]")
  for i, msg in enumerate(messages):  # validate the sampled turns' bookkeeping first
    if msg.get("role") == "assistant" and msg.get("klong") is not None:
      _sampled(msg, i)
  r = fmt.render(messages, tools)
  n = len(r.tokens)
  lps = np.zeros(n, np.float32)
  pvs = np.full(n, -1, np.int32)
  routing = None
  for i, (start, count) in sorted((r.sampled or {}).items()):
    msg = messages[i]
    if msg.get("klong") is None:
      continue  # ids sent back as `token_ids` only: no logprobs or versions to keep
    _, s_lps, s_pvs = _sampled(msg, i)
    lps[start:start + count] = s_lps
    pvs[start:start + count] = s_pvs
    record = msg["klong"].get("routed_experts")
    if not isinstance(record, Mapping):
      continue
    if routing is None:
      shape = record.get("shape") or [0, 0, 0]
      routing = routing_lib.empty(n, int(shape[1]), int(shape[2]))
    try:
      routing_lib.place_turn(routing, record, r.tokens.tolist(), start, count)
    except ValueError as e:  # A malformed record loses its turn's routing, not the rollout.
      log.warning("sampled turn %d: routed_experts ignored: %s", i, e)
  starts = list(r.turn_starts)
  prefix_end = starts[prefix_messages] if prefix_messages < len(messages) else n
  return {
      "tokens": r.tokens,
      "loss_mask": r.loss_mask,
      "logprobs": lps,
      "policy_version": pvs,
      "prefix_end": int(prefix_end),
      "turn_starts": starts,
      "joined": list(r.joined),
      "routing": routing,
      "cut_turns": length_cut_turns(messages, starts, n),
  }


def length_cut_turns(messages: Sequence[Mapping[str, Any]], turn_starts: Sequence[int],
                     num_tokens: int) -> list[list[int]]:
  """[start, end) token spans of the assistant turns whose generation stopped at max_tokens
  (`meta.finish_reason == "length"`, as the agent scaffold records it per reply)."""
  out = []
  for i, msg in enumerate(messages):
    meta = msg.get("meta")
    if msg.get("role") == "assistant" and isinstance(meta, Mapping) and \
        meta.get("finish_reason") == "length":
      end = turn_starts[i + 1] if i + 1 < len(turn_starts) else num_tokens
      out.append([int(turn_starts[i]), int(end)])
  return out

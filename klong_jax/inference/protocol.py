"""OpenAI-compatible request/response models (pydantic) for the inference server.

Requests accept the OpenAI fields we act on and ignore unknown ones (clients send many). Responses
follow the OpenAI shapes; each choice also carries `token_ids` (the exact generated ids, including
the stop token when generation stopped on one) and `policy_version` (an int when one weights
version produced every token, else a per-token list), which the rollout scaffold reads. A chat
message (or the last streamed delta) also carries `reasoning_content` when the model reasoned (the
vLLM/SGLang convention) and `tool_call_error` when its tool-call text was malformed (the text is
then the content and there are no tool_calls); the scaffold answers that with an error observation.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from typing import Any, Literal

import pydantic


class _Lenient(pydantic.BaseModel):
  """Base for requests: unknown fields are ignored, as OpenAI-compatible servers usually do."""

  model_config = pydantic.ConfigDict(extra="ignore")


class SamplingFields(_Lenient):
  """Sampling fields shared by chat and text completions (OpenAI names plus top_k, logprob_mode)."""

  model: str
  max_tokens: int | None = pydantic.Field(default=None, ge=1)
  temperature: float = pydantic.Field(default=1.0, ge=0.0, le=100.0)
  top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
  top_k: int = pydantic.Field(default=0, ge=0)
  n: int = pydantic.Field(default=1, ge=1, le=64)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  seed: int | None = None
  logprob_mode: Literal["tempered", "raw", "processed"] = "tempered"
  user: str | None = None
  # Routing replay (R3) extension: return each token's MoE expert ids (data/routing.py form)
  # from prompt token `routed_experts_start` on, as the choice's `routed_experts`.
  return_routed_experts: bool = False
  routed_experts_start: int = pydantic.Field(default=0, ge=0)

  def stop_strings(self) -> tuple[str, ...]:
    """The stop strings as a tuple (OpenAI allows a string or a list)."""
    if self.stop is None:
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class ChatCompletionRequest(SamplingFields):
  """POST /v1/chat/completions body."""

  messages: list[dict[str, Any]] = pydantic.Field(min_length=1)
  tools: list[dict[str, Any]] | None = None
  tool_choice: Any = None
  logprobs: bool = False
  top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
  max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)
  response_format: dict[str, Any] | None = None
  chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: e.g. {"enable_thinking": false}

  def token_limit(self) -> int | None:
    """max_completion_tokens (new name) wins over max_tokens (deprecated name)."""
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

  def num_top_logprobs(self) -> int:
    """Alternatives to return per token (`top_logprobs`, only with `logprobs: true`)."""
    return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(SamplingFields):
  """POST /v1/completions body; `prompt` is text or a list of token ids (one prompt)."""

  prompt: str | list[int] | list[str] | list[list[int]]
  logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
  echo: bool = False
  max_tokens: int | None = pydantic.Field(default=16, ge=1)

  def token_limit(self) -> int | None:
    return self.max_tokens

  def num_top_logprobs(self) -> int:
    """Alternatives to return per token (the legacy `logprobs: N`)."""
    return self.logprobs or 0


def chat_message(parsed: Any) -> dict[str, Any]:
  """The assistant message of a parsed turn (data/tool_parsers.Parsed); content is None when
  the turn is only tool calls, as OpenAI sends it."""
  message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
  if parsed.reasoning_content:
    message["reasoning_content"] = parsed.reasoning_content
  if parsed.tool_calls:
    message["tool_calls"] = parsed.tool_calls
    message["content"] = parsed.content or None
  if parsed.error:
    message["tool_call_error"] = parsed.error
  return message


def last_chat_delta(rest: dict[str, str], parsed: Any) -> dict[str, Any]:
  """The final streamed delta: text still due (`rest`), the tool calls with their stream index,
  and the tool-call error if any."""
  delta: dict[str, Any] = dict(rest)
  if parsed.tool_calls:
    delta["tool_calls"] = [dict(tc, index=k) for k, tc in enumerate(parsed.tool_calls)]
  if parsed.error:
    delta["tool_call_error"] = parsed.error
  return delta


def new_id(prefix: str) -> str:
  """A fresh OpenAI-style object id, e.g. chatcmpl-1a2b..."""
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
  return int(time.time())


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
  """OpenAI-style error JSON: {"error": {"message", "type", "param", "code"}}."""
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Alternatives per token: (token text, logprob) pairs, likeliest first.
TopLogprobs = list[list[tuple[str, float]]]


def finite_logprob(lp: float) -> float:
  """-inf (a token the sampler could not pick) as -9999.0, as OpenAI does; JSON has no -inf."""
  return lp if math.isfinite(lp) else -9999.0


def _entry(text: str, lp: float) -> dict[str, Any]:
  return {"token": text, "logprob": finite_logprob(lp), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_texts: list[str], logprobs: list[float],
                  top: TopLogprobs | None = None) -> dict[str, Any]:
  """Chat-shaped logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
  top = top or [[] for _ in token_texts]
  return {"content": [dict(_entry(t, lp), top_logprobs=[_entry(*alt) for alt in alts])
                      for t, lp, alts in zip(token_texts, logprobs, top, strict=True)]}


def completion_logprobs(token_texts: list[str], logprobs: list[float], offset0: int = 0,
                        top: TopLogprobs | None = None) -> dict[str, Any]:
  """Legacy completions-shaped logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
  offsets, pos = [], offset0
  for t in token_texts:
    offsets.append(pos)
    pos += len(t)
  tops = []
  for alts in top or [[] for _ in token_texts]:
    d: dict[str, float] = {}
    for text, lp in alts:
      d.setdefault(text, finite_logprob(lp))  # Two ids may decode alike: keep the likelier.
    tops.append(d)
  return {"tokens": token_texts, "token_logprobs": logprobs, "top_logprobs": tops,
          "text_offset": offsets}


def system_fingerprint(model_name: str, policy_version: int) -> str:
  """OpenAI-style `system_fingerprint` ("fp_" + 10 hex): changes whenever the weights do."""
  digest = hashlib.sha256(f"{model_name}:{policy_version}".encode()).hexdigest()
  return f"fp_{digest[:10]}"


def usage(prompt_tokens: int, completion_tokens: int,
          cached_tokens: int | None = None) -> dict[str, Any]:
  """OpenAI usage; `cached_tokens` (prompt tokens the prefix cache served) goes in
  `prompt_tokens_details` as OpenAI and vLLM report it."""
  out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
  if cached_tokens is not None:
    out["prompt_tokens_details"] = {"cached_tokens": int(cached_tokens)}
  return out


def cached_tokens(completions: list[Any]) -> int:
  """Prompt tokens served from the prefix cache for a request's choices: the fewest of any
  choice (each choice is its own engine request on the one prompt)."""
  return min((int(getattr(c, "cached_tokens", 0)) for c in completions), default=0)


def version_field(versions: list[int], current: int) -> int | list[int]:
  """policy_version of a choice: an int if one version made every token, else per-token list.

  With no tokens generated it is `current`, the version being served.
  """
  if not versions:
    return current
  return versions[0] if len(set(versions)) == 1 else list(versions)

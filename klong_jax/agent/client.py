"""OpenAI-compatible chat client for the scaffold: retries with backoff, keeps server extras.

Each call returns the assistant message as a plain dict. When the server sends the sampled
`token_ids`, `logprobs.content[*].logprob` and `policy_version` on the choice, they are stored
verbatim under `message["klong"]` for the trajectory renderer, as is the `routed_experts`
record (routing replay) when asked for with `routing_from`. The model's reasoning is kept as
`reasoning_content` (from that field, vLLM's newer `reasoning`, or a leading `<think>` block in
the content of an endpoint that does not split it), and our server's `tool_call_error` (its
tool-call text was malformed) is passed on for the scaffold to answer.
"""

from __future__ import annotations

import time
from typing import Any

import openai

from klong_jax.data import tool_parsers


class InfraError(RuntimeError):
  """The policy server failed after all retries (the episode becomes infra_error)."""


class ContextLengthError(RuntimeError):
  """The server rejected the request as longer than the model context."""


def make_client(base_url: str, api_key: str = "EMPTY", timeout_s: float = 600.0) -> openai.OpenAI:
  """An OpenAI client for any compatible endpoint (our server, a teacher, vLLM)."""
  return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)


def _is_context_error(e: Exception) -> bool:
  text = str(e).lower()
  return any(k in text for k in ("context length", "context_length", "maximum context",
                                 "too many tokens", "prompt is too long"))


def extract_klong(choice: dict[str, Any], response: dict[str, Any]) -> dict[str, Any] | None:
  """Pulls token_ids / logprobs / policy_version from a choice (or the response) dict."""
  out: dict[str, Any] = {}
  ids = choice.get("token_ids")
  if ids is None:
    ids = (choice.get("message") or {}).get("token_ids")
  if isinstance(ids, list):
    out["token_ids"] = [int(t) for t in ids]
  content = (choice.get("logprobs") or {}).get("content")
  if isinstance(content, list):
    out["logprobs"] = [float(c.get("logprob", 0.0)) for c in content if isinstance(c, dict)]
  pv = choice.get("policy_version", response.get("policy_version"))
  if pv is not None:
    out["policy_version"] = pv
  routed = choice.get("routed_experts")
  if isinstance(routed, dict):
    out["routed_experts"] = routed
  return out or None


def assistant_message(msg: dict[str, Any], parser: tool_parsers.ToolParser | None = None,
                      tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
  """The history form of a response message: role, content, reasoning, tool calls, parse error.

  With `parser` (the model family's, data/tool_parsers.py), tool-call text an endpoint left in
  the content unparsed (one serving without a tool parser) is parsed here.
  """
  content = msg.get("content") or ""
  reasoning = msg.get("reasoning_content") or msg.get("reasoning")
  if not reasoning and tool_parsers.THINK_CLOSE in content:
    reasoning, rest = tool_parsers.split_reasoning(content)
    content = rest if reasoning is not None else content
  out: dict[str, Any] = {"role": "assistant", "content": content}
  if isinstance(reasoning, str) and reasoning:
    out["reasoning_content"] = reasoning
  if msg.get("tool_calls"):
    out["tool_calls"] = [
        {"id": tc.get("id") or f"call_{i}", "type": "function",
         "function": {"name": (tc.get("function") or {}).get("name") or "",
                      "arguments": (tc.get("function") or {}).get("arguments") or ""}}
        for i, tc in enumerate(msg["tool_calls"])]
  elif msg.get("tool_call_error"):
    out["tool_call_error"] = str(msg["tool_call_error"])
  elif parser is not None and (parser.call_open in content or parser.call_close in content):
    parsed = parser.parse(content, tools)
    out["content"] = parsed.content
    if parsed.reasoning_content and "reasoning_content" not in out:
      out["reasoning_content"] = parsed.reasoning_content
    if parsed.tool_calls:
      out["tool_calls"] = parsed.tool_calls
    if parsed.error:
      out["tool_call_error"] = parsed.error
  return out


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, Any]],
         tools: list[dict[str, Any]] | None, max_tokens: int, temperature: float = 1.0,
         retries: int = 3, backoff_s: float = 1.0, routing_from: int | None = None,
         parser: tool_parsers.ToolParser | None = None,
         seed: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """One chat completion; returns (assistant message dict, info with usage/finish_reason/latency).

  `routing_from` (routing replay): ask the server for the MoE expert ids of the prompt tokens
  from this index on and of the sampled tokens (None: do not ask). `parser`: see
  assistant_message. `seed`: the request's sampling seed (OpenAI's `seed`; our server makes a
  request's tokens a function of its prompt, weights and seed); None: the server draws one.
  Connection errors, timeouts, 5xx and 429 are retried with exponential backoff, then raise
  InfraError; a context-length rejection raises ContextLengthError (the caller trims).
  """
  last: Exception | None = None
  for attempt in range(retries + 1):
    t0 = time.time()
    try:
      extra: dict[str, Any] = {"return_token_ids": True}
      if routing_from is not None:
        extra.update(return_routed_experts=True, routed_experts_start=int(routing_from))
      kwargs: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "logprobs": True,
                                "extra_body": extra}
      if tools:
        kwargs["tools"] = tools
      if seed is not None:
        kwargs["seed"] = int(seed)
      resp = client.chat.completions.create(**kwargs)
      data = resp.model_dump()
      if not data.get("choices"):
        raise InfraError(f"server returned no choices: {str(data)[:300]}")
      choice = data["choices"][0]
      out = assistant_message(choice.get("message") or {}, parser, tools)
      klong = extract_klong(choice, data)
      if klong:
        out["klong"] = klong
      info = {"usage": data.get("usage") or {}, "finish_reason": choice.get("finish_reason"),
              "latency_s": time.time() - t0, "attempts": attempt + 1}
      return out, info
    except openai.BadRequestError as e:
      if _is_context_error(e):
        raise ContextLengthError(str(e)) from e
      raise InfraError(f"policy server rejected the request: {e}") from e
    except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
            openai.RateLimitError, openai.APIStatusError) as e:
      if isinstance(e, openai.APIStatusError) and _is_context_error(e):
        raise ContextLengthError(str(e)) from e
      status = getattr(e, "status_code", None)
      if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
        raise InfraError(f"policy server rejected the request (HTTP {status}): {e}") from e
      last = e
    if attempt < retries:
      time.sleep(backoff_s * (2 ** attempt))
  raise InfraError(f"policy server failed after {retries + 1} attempts: {last}")

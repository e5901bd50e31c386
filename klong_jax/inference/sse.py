"""Server-sent events for `stream: true`: one chunk per token, then the final choice and [DONE].

Split from server.py: the per-token chunk shapes (chat vs completion, logprobs, reasoning and
tool-call deltas) are the one part of the HTTP layer that is about streaming only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from klong_jax.inference import protocol
from klong_jax.inference.engine import Completion, TokenEvent

if TYPE_CHECKING:
  from klong_jax.inference.server import Server


def stream_response(server: Server, req: Any, prompt: list[int], chat: bool) -> StreamingResponse:
  """SSE: one chunk per token (text delta, logprob, token id, version), then [DONE].

  Chat text goes through the server's tool-call parser as it streams (data/tool_stream.py):
  deltas carry `reasoning_content` and `content` once certain (no partial tags); tool calls,
  and any `tool_call_error`, come in the final chunk, when the turn can be parsed whole.
  """
  handles = [server.submit(prompt, server.sampling(req, i)) for i in range(req.n)]
  rid = protocol.new_id("chatcmpl" if chat else "cmpl")
  obj = "chat.completion.chunk" if chat else "text_completion"
  in_think = chat and server.prompt_in_think(prompt)
  parsers = [server.parser.stream(req.tools, in_think) for _ in handles] if chat else []
  want_lp = bool(req.logprobs) if chat else req.logprobs is not None

  def chunk(choice: dict[str, Any], usage: dict | None = None,
            version: int | None = None) -> str:
    version = server.engine.policy_version if version is None else version
    body = {"id": rid, "object": obj, "created": protocol.now(), "model": server.model_name,
            "system_fingerprint": protocol.system_fingerprint(server.model_name, version),
            "choices": [choice] if choice else []}
    if usage is not None:
      body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"

  def token_choice(i: int, ev: TokenEvent) -> dict[str, Any]:
    has_tok = ev.token_id >= 0
    ids = [ev.token_id] if has_tok else []
    top = server.top_texts([ev.top_logprobs or []])
    if chat:
      choice = {"index": i, "delta": parsers[i].feed(ev.text) or {"content": ""},
                "finish_reason": None}
      if want_lp and has_tok:
        choice["logprobs"] = protocol.chat_logprobs(server.token_texts(ids), [ev.logprob], top)
    else:
      choice = {"index": i, "text": ev.text, "finish_reason": None}
      if want_lp and has_tok:
        choice["logprobs"] = protocol.completion_logprobs(server.token_texts(ids), [ev.logprob],
                                                          top=top)
    choice["token_ids"] = ids
    choice["policy_version"] = ev.policy_version
    return choice

  def final_choice(i: int, c: Completion) -> dict[str, Any]:
    reason = c.finish_reason
    if chat:
      rest, parsed = parsers[i].finish()
      if parsed.tool_calls and reason == "stop":
        reason = "tool_calls"
      choice = {"index": i, "delta": protocol.last_chat_delta(rest, parsed),
                "finish_reason": reason}
    else:
      choice = {"index": i, "text": "", "finish_reason": reason}
    choice.update(server.extra(c, req.routed_experts_start))
    choice.pop("token_ids")  # Already streamed one by one.
    return choice

  async def events() -> AsyncIterator[str]:
    try:
      if chat:
        for i in range(len(handles)):
          yield chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                       "finish_reason": None})
      done: list[Completion] = []
      for i, (_, queue) in enumerate(handles):
        while True:
          ev = await queue.get()
          if isinstance(ev, Completion):
            if ev.finish_reason == "error":
              err = protocol.error_body(f"generation failed: {ev.error}", "server_error")
              yield f"data: {json.dumps(err)}\n\n"
              return
            done.append(ev)
            yield chunk(final_choice(i, ev))
            break
          yield chunk(token_choice(i, ev), version=ev.policy_version)
      if (req.stream_options or {}).get("include_usage"):
        yield chunk({}, protocol.usage(len(prompt), sum(len(c.token_ids) for c in done),
                                        protocol.cached_tokens(done)))
      yield "data: [DONE]\n\n"
    finally:
      for handle, _ in handles:
        if not handle.done:
          server.engine.cancel(handle)

  return StreamingResponse(events(), media_type="text/event-stream")

"""A small OpenAI-compatible server around any Python policy `policy(messages, tools) -> message`.

Serves /v1/chat/completions (non-streaming), /v1/models and /health. The scripted teacher and the
tests use it as the model endpoint. A policy's message may carry `klong` (token_ids, logprobs,
policy_version); they are sent on the choice the way our inference server sends them, and its
`reasoning_content` and `tool_call_error` on the message, as our server sends them.

No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation.
"""

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

Policy = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], dict[str, Any]]


def make_app(policy: Policy, model_name: str = "policy"):
  """The FastAPI app serving `policy`."""
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse

  app = FastAPI(title="klong policy server")
  lock = threading.Lock()

  @app.get("/health")
  def health() -> dict:
    return {"ok": True}

  @app.get("/v1/models")
  def models() -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "klong"}]}

  @app.post("/v1/chat/completions")
  async def completions(request: Request):
    try:
      body = await request.json()
    except Exception:  # noqa: BLE001
      return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
    messages = body.get("messages")
    if not isinstance(messages, list):
      return JSONResponse({"error": {"message": "'messages' must be a list"}}, status_code=400)
    try:
      with lock:
        msg = dict(policy(messages, body.get("tools")))
    except Exception as e:  # noqa: BLE001 - surfaced as a 500 the client retries.
      return JSONResponse({"error": {"message": f"policy failed: {e}"}}, status_code=500)
    klong = msg.pop("klong", None) or {}
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    for key in ("reasoning_content", "tool_call_error"):
      if msg.get(key):
        message[key] = msg[key]
    if msg.get("tool_calls"):
      message["tool_calls"] = [
          {"id": tc.get("id") or f"call_{uuid.uuid4().hex[:8]}", "type": "function",
           "function": tc["function"]} for tc in msg["tool_calls"]]
    choice: dict[str, Any] = {"index": 0, "message": message,
                              "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}
    if "token_ids" in klong:
      choice["token_ids"] = klong["token_ids"]
    if "logprobs" in klong:
      choice["logprobs"] = {"content": [{"token": "", "logprob": lp, "bytes": None,
                                         "top_logprobs": []} for lp in klong["logprobs"]]}
    if "policy_version" in klong:
      choice["policy_version"] = klong["policy_version"]
    n_out = len(klong.get("token_ids", [])) or max(1, len(str(message)) // 4)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", model_name),
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": n_out, "total_tokens": n_out}}

  return app


def serve_in_thread(policy: Policy, host: str = "127.0.0.1", port: int = 0,
                    model_name: str = "policy") -> tuple[str, Callable[[], None]]:
  """Starts the server in a daemon thread; returns (base_url ending in /v1, stop_fn)."""
  import uvicorn
  config = uvicorn.Config(make_app(policy, model_name), host=host, port=port, log_level="warning",
                          lifespan="off")
  server = uvicorn.Server(config)
  th = threading.Thread(target=server.run, daemon=True)
  th.start()
  deadline = time.time() + 30
  while not server.started:
    if time.time() > deadline or not th.is_alive():
      raise RuntimeError(f"policy server failed to start on {host}:{port}")
    time.sleep(0.02)
  real_port = server.servers[0].sockets[0].getsockname()[1]

  def stop() -> None:
    server.should_exit = True
    th.join(10)

  return f"http://{host}:{real_port}/v1", stop

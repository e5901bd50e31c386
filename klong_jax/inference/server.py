"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream` SSE, `logprobs`,
tools/tool_calls for chat), GET /v1/models, GET /health, GET /metrics (Prometheus text), POST
/admin/load_policy (load a version from the policy dir now). Each choice carries `token_ids` and
`policy_version` besides the OpenAI fields; responses and chunks carry a `system_fingerprint` (model
name + policy version). With `return_routed_experts: true` (extra body) a choice also carries
`routed_experts`: the MoE expert ids of its prompt and sampled tokens for routing replay (R3,
data/routing.py). Chat answers are parsed by the served model's tool-call family
(data/tool_parsers.py: klong, glm45, qwen3; `serve.tool_parser`, else detected from the tokenizer
directory): `reasoning_content` apart from `content`, OpenAI `tool_calls`, and for malformed
tool-call text `tool_call_error` (the text stays content). Bad requests get 4xx with an OpenAI
error body.

Run: `python -m klong_jax.inference.server --bundle=DIR` or `--config=configs/serve_tiny.py
--policy_dir=RUN/policy`. FastAPI/uvicorn: the well-kept async stack with pydantic models, SSE via
StreamingResponse, and a loopback server we can start in-process for tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from typing import Any

import fastapi
import prometheus_client
import pydantic
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from klong_jax.data import routing as routing_lib
from klong_jax.data import tool_parsers
from klong_jax.inference import protocol, serve_config, sse
from klong_jax.inference.engine import Completion, ContextLengthError, Engine
from klong_jax.inference.sampler import SamplingParams

log = logging.getLogger(__name__)


class ApiError(Exception):
  """An error answered with an OpenAI-style body and an HTTP status."""

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               code: str | None = None, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type_
    self.code, self.param = code, param


class _EngineCollector:
  """Exposes the engine's counters and gauges to Prometheus."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    for name, value in sorted(self.engine.stats.items()):
      c = CounterMetricFamily(f"klong_engine_{name.removesuffix('_total')}", f"engine {name}")
      c.add_metric([], value)
      yield c
    for name, value in (("running_requests", self.engine.num_running()),
                        ("waiting_requests", self.engine.num_waiting()),
                        ("policy_version", self.engine.policy_version),
                        ("max_batch", self.engine.sampler.max_batch)):
      g = GaugeMetricFamily(f"klong_engine_{name}", name.replace("_", " "))
      g.add_metric([], value)
      yield g


_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt")


class Server:
  """Request handling state: engine, tokenizer, chat format, names and limits."""

  def __init__(self, engine: Engine, tokenizer: Any, chat_format: Any, *, model_name: str,
               max_body_bytes: int = 4 << 20, watcher: Any = None,
               tool_parser: str | tool_parsers.ToolParser = "klong"):
    self.engine, self.tokenizer, self.chat = engine, tokenizer, chat_format
    self.parser = (tool_parsers.get_parser(tool_parser, chat_format=chat_format)
                   if isinstance(tool_parser, str) else tool_parser)
    self.model_name, self.max_body_bytes, self.watcher = model_name, max_body_bytes, watcher
    self.created = protocol.now()
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    self.http_requests = prometheus_client.Counter(
        "klong_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
        registry=self.registry)
    self.latency = prometheus_client.Histogram(
        "klong_request_latency_seconds", "Completion latency", ["endpoint"],
        registry=self.registry)

  # ---- request parsing -----------------------------------------------------------------------

  async def parse(self, request: fastapi.Request, model: type[pydantic.BaseModel]) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
      raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                     f"{self.max_body_bytes} bytes", code="request_too_large")
    body = b""
    async for chunk in request.stream():
      body += chunk
      if len(body) > self.max_body_bytes:
        raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                       code="request_too_large")
    try:
      data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from e
    try:
      req = model.model_validate(data)
    except pydantic.ValidationError as e:
      first = e.errors()[0]
      param = ".".join(str(p) for p in first.get("loc", ()))
      raise ApiError(400, f"invalid request: {param}: {first.get('msg')}", param=param or None,
                     code="invalid_value") from e
    if req.model != self.model_name:
      raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                     f"{self.model_name!r} (see GET /v1/models)", code="model_not_found",
                     param="model")
    return req

  def sampling(self, req: protocol.SamplingFields, index: int) -> SamplingParams:
    seed = None if req.seed is None else req.seed + index
    return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          max_tokens=req.token_limit(), stop=req.stop_strings(), seed=seed,
                          logprob_mode=req.logprob_mode, top_logprobs=req.num_top_logprobs(),
                          return_routing=req.return_routed_experts)

  def submit(self, prompt: list[int], sp: SamplingParams) -> tuple[Any, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    try:
      handle = self.engine.submit(prompt, sp,
                                  lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except ContextLengthError as e:
      raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from e
    except ValueError as e:
      raise ApiError(400, str(e), code="invalid_value") from e
    return handle, queue

  async def wait_all(self, prompt: list[int], req: protocol.SamplingFields) -> list[Completion]:
    handles = [self.submit(prompt, self.sampling(req, i)) for i in range(req.n)]
    try:
      out = []
      for _, queue in handles:
        while not isinstance(ev := await queue.get(), Completion):
          pass
        if ev.finish_reason == "error":
          raise ApiError(500, f"generation failed: {ev.error}", type_="server_error")
        out.append(ev)
      return out
    finally:
      for handle, _ in handles:
        if not handle.done:
          self.engine.cancel(handle)

  def token_texts(self, ids: list[int]) -> list[str]:
    return [self.tokenizer.decode([t]) for t in ids]

  def top_texts(self, top: list[list[tuple[int, float]]]) -> protocol.TopLogprobs:
    """Each token's alternatives with ids decoded to text."""
    return [[(self.tokenizer.decode([t]), lp) for t, lp in alts] for alts in top]

  def extra(self, c: Completion, routing_start: int = 0) -> dict[str, Any]:
    """Our per-choice fields: sampled ids, policy version, and recorded routing if asked for."""
    out = {"token_ids": c.token_ids,
           "policy_version": protocol.version_field(c.policy_versions, self.engine.policy_version)}
    if c.routing is not None:
      start = min(routing_start, len(c.prompt_ids))
      out["routed_experts"] = dict(routing_lib.encode(c.routing[start:]), start=start,
                                   prompt_len=len(c.prompt_ids),
                                   prompt_crc32=routing_lib.prompt_checksum(c.prompt_ids))
    return out

  def fingerprint(self, comps: list[Completion] | None = None) -> str:
    """system_fingerprint: model name + the newest weights version that made these tokens."""
    versions = [v for c in comps or [] for v in c.policy_versions]
    return protocol.system_fingerprint(
        self.model_name, max(versions) if versions else self.engine.policy_version)

  # ---- chat ----------------------------------------------------------------------------------

  def check_chat(self, req: protocol.ChatCompletionRequest) -> None:
    """Rejects what OpenAI rejects and what we cannot honour, naming the field and the fix."""
    if req.top_logprobs is not None and not req.logprobs:
      raise ApiError(400, "top_logprobs needs logprobs: true; set logprobs to true or drop "
                     "top_logprobs", param="top_logprobs", code="invalid_value")
    for i, m in enumerate(req.messages):
      if m.get("role") == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise ApiError(400, f"messages[{i}] has role 'tool' but no tool_call_id; set it to the "
                       "id of the assistant tool call it answers", param=f"messages[{i}]."
                       "tool_call_id", code="missing_required_parameter")
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
      raise ApiError(400, f"response_format {{'type': {rf.get('type')!r}}} is not supported: "
                     "this server only generates plain text; drop response_format or set it to "
                     "{'type': 'text'}", param="response_format", code="unsupported_value")

  def chat_prompt(self, req: protocol.ChatCompletionRequest) -> list[int]:
    """The prompt ids: the served model's chat template over messages and tools, with the
    request's `chat_template_kwargs` (as vLLM takes them, e.g. enable_thinking)."""
    kwargs = req.chat_template_kwargs or {}
    bad = sorted(k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if bad:
      raise ApiError(400, f"chat_template_kwargs may not set {bad}: the server passes messages, "
                     "tools and add_generation_prompt itself", param="chat_template_kwargs")
    try:
      return self.chat.render_prompt(req.messages, req.tools, **kwargs)
    except (ValueError, KeyError, TypeError) as e:
      raise ApiError(400, f"cannot render messages: {e}", param="messages") from e

  def prompt_in_think(self, prompt: list[int]) -> bool:
    """Whether the rendered prompt opened a `<think>` block the model continues."""
    return tool_parsers.opens_think(self.tokenizer.decode(prompt[-16:])) if prompt else False

  def chat_choice(self, i: int, c: Completion, logprobs: bool, routing_start: int = 0,
                  tools: list[dict[str, Any]] | None = None,
                  in_think: bool = False) -> dict[str, Any]:
    parsed = self.parser.parse(c.text, tools, in_think)
    reason = c.finish_reason
    if parsed.tool_calls and reason == "stop":
      reason = "tool_calls"
    choice = {"index": i, "message": protocol.chat_message(parsed), "finish_reason": reason,
              "logprobs": (protocol.chat_logprobs(self.token_texts(c.token_ids), c.logprobs,
                                                  self.top_texts(c.top_logprobs))
                           if logprobs else None)}
    choice.update(self.extra(c, routing_start))
    return choice

  async def chat_completions(self, request: fastapi.Request) -> Any:
    req = await self.parse(request, protocol.ChatCompletionRequest)
    self.check_chat(req)
    prompt = self.chat_prompt(req)
    if req.stream:
      return self.stream(req, prompt, chat=True)
    comps = await self.wait_all(prompt, req)
    in_think = self.prompt_in_think(prompt)
    return {"id": protocol.new_id("chatcmpl"), "object": "chat.completion",
            "created": protocol.now(), "model": self.model_name,
            "system_fingerprint": self.fingerprint(comps),
            "choices": [self.chat_choice(i, c, req.logprobs, req.routed_experts_start,
                                         req.tools, in_think)
                        for i, c in enumerate(comps)],
            "usage": protocol.usage(len(prompt), sum(len(c.token_ids) for c in comps),
                                   protocol.cached_tokens(comps))}

  # ---- text completions ----------------------------------------------------------------------

  def text_prompt(self, req: protocol.CompletionRequest) -> list[int]:
    p = req.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
      p = p[0]
    if isinstance(p, str):
      return self.tokenizer.encode(p)
    if isinstance(p, list) and all(isinstance(t, int) for t in p):
      if any(t < 0 or t >= self.engine.sampler.vocab_size for t in p):
        raise ApiError(400, f"prompt token ids must be in [0, {self.engine.sampler.vocab_size})",
                       param="prompt")
      return list(p)
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                   param="prompt")

  async def completions(self, request: fastapi.Request) -> Any:
    req = await self.parse(request, protocol.CompletionRequest)
    prompt = self.text_prompt(req)
    if req.stream:
      return self.stream(req, prompt, chat=False)
    comps = await self.wait_all(prompt, req)
    prefix = self.tokenizer.decode(prompt) if req.echo else ""
    choices = []
    for i, c in enumerate(comps):
      choice = {"index": i, "text": prefix + c.text, "finish_reason": c.finish_reason,
                "logprobs": (protocol.completion_logprobs(self.token_texts(c.token_ids),
                                                          c.logprobs, len(prefix),
                                                          self.top_texts(c.top_logprobs))
                             if req.logprobs is not None else None)}
      choice.update(self.extra(c, req.routed_experts_start))
      choices.append(choice)
    return {"id": protocol.new_id("cmpl"), "object": "text_completion",
            "created": protocol.now(), "model": self.model_name,
            "system_fingerprint": self.fingerprint(comps), "choices": choices,
            "usage": protocol.usage(len(prompt), sum(len(c.token_ids) for c in comps),
                                   protocol.cached_tokens(comps))}

  # ---- streaming -----------------------------------------------------------------------------

  def stream(self, req: Any, prompt: list[int], chat: bool) -> StreamingResponse:
    """SSE response (inference/sse.py)."""
    return sse.stream_response(self, req, prompt, chat)

  # ---- misc ----------------------------------------------------------------------------------

  def models(self) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": self.model_name, "object": "model", "created": self.created,
        "owned_by": "klong-jax", "max_model_len": self.engine.sampler.max_len,
        "policy_version": self.engine.policy_version}]}

  def health(self) -> dict[str, Any]:
    link = getattr(self.engine, "link", None)  # Multi-host: a dead link fails every request.
    if link is not None and link.error is not None:
      raise ApiError(503, f"{link.error}", type_="server_error", code="multihost_link_failed")
    return {"status": "ok", "model": self.model_name,
            "policy_version": self.engine.policy_version,
            "running": self.engine.num_running(), "waiting": self.engine.num_waiting()}

  async def load_policy(self, request: fastapi.Request) -> dict[str, Any]:
    if self.watcher is None:
      raise ApiError(400, "this server has no policy directory; start it with --policy_dir",
                     code="no_policy_dir")
    body = await request.body()
    try:
      data = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError as e:
      raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from e
    version = data.get("version") if isinstance(data, dict) else None
    try:
      if version is None:
        loaded = await asyncio.to_thread(self.watcher.check)
      else:
        loaded = await asyncio.to_thread(self.watcher.load, int(version))
    except (FileNotFoundError, ValueError) as e:
      raise ApiError(404, f"cannot load policy version {version}: {e}",
                     code="policy_not_found") from e
    return {"loaded": loaded, "policy_version": self.engine.policy_version}


def create_app(server: Server) -> fastapi.FastAPI:
  """The FastAPI app routing to `server`; errors become OpenAI-style bodies."""
  app = fastapi.FastAPI(title="klong-jax inference", docs_url=None, redoc_url=None)
  app.state.server = server

  @app.exception_handler(ApiError)
  async def _api_error(request: fastapi.Request, e: ApiError) -> JSONResponse:
    return JSONResponse(protocol.error_body(e.message, e.type, e.code, e.param),
                        status_code=e.status)

  @app.exception_handler(Exception)
  async def _internal(request: fastapi.Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(protocol.error_body(f"internal error: {type(e).__name__}: {e}",
                                            "server_error"), status_code=500)

  @app.middleware("http")
  async def _count(request: fastapi.Request, call_next):
    start = time.monotonic()
    response = await call_next(request)
    path = request.url.path
    if path.startswith("/v1/") and request.method == "POST":
      server.latency.labels(path).observe(time.monotonic() - start)
    server.http_requests.labels(path if path in _ROUTES else "other",
                                str(response.status_code)).inc()
    return response

  app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
  app.add_api_route("/v1/completions", server.completions, methods=["POST"])
  app.add_api_route("/v1/models", server.models, methods=["GET"])
  app.add_api_route("/health", server.health, methods=["GET"])
  app.add_api_route("/admin/load_policy", server.load_policy, methods=["POST"])

  @app.get("/metrics")
  def _metrics() -> PlainTextResponse:
    return PlainTextResponse(prometheus_client.generate_latest(server.registry).decode(),
                             media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @app.exception_handler(404)
  async def _not_found(request: fastapi.Request, e: Exception) -> JSONResponse:
    return JSONResponse(protocol.error_body(f"no route {request.method} {request.url.path}",
                                            "invalid_request_error", "not_found"), 404)

  @app.exception_handler(405)
  async def _bad_method(request: fastapi.Request, e: Exception) -> JSONResponse:
    return JSONResponse(protocol.error_body(
        f"method {request.method} not allowed on {request.url.path}", "invalid_request_error",
        "method_not_allowed"), 405)

  return app


_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                     "/metrics", "/admin/load_policy"})


# ---- building and running ------------------------------------------------------------------


def build(config: Any = None, *, bundle: str | None = None,
          policy_dir: str | None = None) -> Server:
  """Builds model, sampler, engine, tokenizer, chat format and policy watcher from a bundle or a
  config (`model`, `mesh`, `serve` sections); loads the newest policy version if there is one."""
  import jax.numpy as jnp
  import ml_collections

  from klong_jax.data import tokenizer as tokenizer_lib
  from klong_jax.data.chat import ChatFormat
  from klong_jax.inference import export, multihost, reload
  from klong_jax.inference.sampler import Sampler
  from klong_jax.model.config import from_config_dict
  from klong_jax.model.sharded import create_sharded_model
  from klong_jax.parallel.mesh import make_mesh
  from klong_jax.parallel.rules import resolve_rules

  serve = serve_config.resolve(config)
  mesh_cfg = config.mesh if config is not None and "mesh" in config else \
      ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  if bundle:
    b = export.load_bundle(bundle)
    cfg, tok_path, name = b.model_config, str(b.tokenizer_path), b.model_name
    root = policy_dir or str(b.policy_root)
  else:
    if config is None:
      raise ValueError("pass a bundle (--bundle) or a config with a `model` section (--config)")
    cfg, name, root = from_config_dict(config.model), serve.model_name, policy_dir
    tok_path = serve.tokenizer or tokenizer_lib.default_tokenizer(
        serve.tokenizer_cache, vocab_size=cfg.vocab_size).path
  tok = tokenizer_lib.load(tok_path)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model only "
                     f"{cfg.vocab_size}; export the matching tokenizer")
  chat = ChatFormat(tok)
  family = serve.tool_parser or tool_parsers.family_for(tok_path)
  parser = tool_parsers.get_parser(family, chat_format=chat)
  log.info("tool-call parser: %s%s", family, "" if serve.tool_parser else " (detected)")
  if serve.compile_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", serve.compile_cache_dir)
  mesh = make_mesh(mesh_cfg)
  log.info("building %s on mesh %s", name, dict(mesh.shape))
  # The config's rules (serve configs: parallel/rules.SERVING_RULES, no per-step weight gathers).
  rules = resolve_rules(config.get("rules") if config is not None else None)
  model = create_sharded_model(cfg, mesh, seed=serve.seed, rules=rules)
  if serve.engine not in ("paged", "dense"):
    raise ValueError(f"serve.engine {serve.engine!r} not in ('paged', 'dense')")
  sampler = Sampler(model, max_batch=serve.max_batch, max_len=serve.max_len, mesh=mesh,
                    rules=rules, cache_dtype=jnp.dtype(serve.cache_dtype),
                    min_prefill_bucket=serve.min_prefill_bucket,
                    min_prefill_rows=serve.min_prefill_rows,
                    dense_cache=serve.engine == "dense")
  del model  # The sampler holds the weights: the policy load below then frees them first.
  prefix_cache = None
  if serve.engine == "paged":
    from klong_jax.inference.paged.engine import PagedEngine, default_num_pages
    engine = PagedEngine(
        sampler, tok, schedule=serve.schedule, stop_token_ids=chat.stop_token_ids,
        replica_id=serve.replica_id, page_size=serve.prefix_block,
        num_pages=serve.kv_pages or default_num_pages(sampler, serve.prefix_block,
                                                      serve.prefix_cache_mb),
        prefix_caching=serve.prefix_cache_mb > 0, token_budget=serve.token_budget,
        decode_steps=serve.decode_steps, attention_impl=serve.paged_attention)
    log.info("paged KV cache: %d pages of %d tokens (%.0f MiB)", engine.alloc.num_pages,
             serve.prefix_block, engine.pool_bytes / (1 << 20))
    engine.precompile_on_start = serve.precompile  # In the engine thread, before serving.
  elif serve.prefix_cache_mb > 0:
    from klong_jax.inference.prefix_cache import PrefixCache
    prefix_cache = PrefixCache(sampler, block_size=serve.prefix_block,
                               max_bytes=int(serve.prefix_cache_mb * (1 << 20)))
    log.info("prefix cache: %d blocks of %d tokens (%.0f MiB)", prefix_cache.num_blocks,
             serve.prefix_block, serve.prefix_cache_mb)
  if serve.engine == "dense":
    engine = Engine(sampler, tok, schedule=serve.schedule, stop_token_ids=chat.stop_token_ids,
                    prefix_cache=prefix_cache, replica_id=serve.replica_id)
  watcher = None
  if root:
    watcher = reload.PolicyWatcher(engine, root, serve.reload_interval_s)
    latest = multihost.agreed_version(reload.latest_version(root))  # Multi-host: process 0's.
    if latest is not None:
      reload.swap_in_place(sampler, f"{root}/{latest}", latest)  # Never two full copies.
      watcher.loaded = latest
      log.info("serving policy version %d from %s", latest, root)
    else:
      log.warning("no policy under %s yet: serving freshly initialised weights as version 0",
                  root)
  return Server(engine, tok, chat, model_name=name, max_body_bytes=serve.max_body_bytes,
                watcher=watcher, tool_parser=parser)


class Running:
  """A server running in a background thread (`url`, `stop()`)."""

  def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0,
               reload_interval_s: float = 0.0):
    import socket
    import threading

    import uvicorn

    self.server = server
    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind((host, port))
    self.port = self.sock.getsockname()[1]
    self.url = f"http://{host}:{self.port}"
    self._uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning",
                                             timeout_graceful_shutdown=5))
    server.engine.start()
    if server.watcher is not None and reload_interval_s > 0:
      server.watcher.start()
    self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self.sock]},
                                    name="klong-http", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self._uv.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError("the HTTP server did not start")
      time.sleep(0.02)

  def stop(self) -> None:
    self._uv.should_exit = True
    self._thread.join(timeout=10)
    if self.server.watcher is not None:
      self.server.watcher.stop()
    self.server.engine.stop()
    self.sock.close()


def run(config: Any, bundle: str | None = None, policy_dir: str | None = None) -> None:
  """Builds the server and serves until interrupted (SIGINT/SIGTERM).

  Multi-host (KLONG_COORDINATOR / KLONG_NUM_PROCESSES / KLONG_PROCESS_ID, as launch/tpu.py sets
  them on every host of a slice): every process builds the same engine on the global mesh;
  process 0 serves HTTP and schedules, the others run the device calls it announces
  (inference/multihost.py) until it stops."""
  import jax
  import uvicorn

  from klong_jax.inference import multihost
  from klong_jax.parallel.mesh import maybe_initialize_distributed

  distributed = maybe_initialize_distributed()
  server = build(config, bundle=bundle, policy_dir=policy_dir)
  serve = serve_config.resolve(config)
  if multihost.join(server.engine):  # A follower: ran process 0's calls until it stopped.
    return
  server.engine.start()
  if server.watcher is not None and serve.reload_interval_s > 0:
    server.watcher.interval_s = serve.reload_interval_s
    server.watcher.start()
  # uvicorn re-raises the SIGTERM it shut down on once it is done; with the default handler that
  # killed the process before the `finally` below (engine, watcher, followers) could run.
  signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: server stopped"))
  log.info("serving %s on http://%s:%d", server.model_name, serve.host, serve.port)
  try:
    uvicorn.run(create_app(server), host=serve.host, port=serve.port, log_level="info")
  finally:
    if server.watcher is not None:
      server.watcher.stop()
    server.engine.stop()  # Multi-host: also stops the followers.
    if distributed:
      jax.distributed.shutdown()


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  config = f.config
  if config is None:
    import ml_collections
    config = ml_collections.ConfigDict({"serve": serve_config.serve_defaults()})
  with config.unlocked():
    if "serve" not in config:
      config.serve = serve_config.serve_defaults()
    for name in ("host", "port", "max_batch", "max_len", "min_prefill_bucket",
                 "min_prefill_rows", "prefix_cache_mb", "tool_parser"):
      if f[name].present:
        config.serve[name] = f[name].value
  if not f.bundle and "model" not in config:
    raise ValueError("pass --bundle=DIR or --config=configs/serve_tiny.py")
  run(config, bundle=f.bundle, policy_dir=f.policy_dir)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  if "bundle" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, "Config with model/mesh/serve sections.")
  flags.DEFINE_string("bundle", None, "Serving bundle dir (from klong_jax.inference.export).")
  flags.DEFINE_string("policy_dir", None, "Policy root <run>/policy to serve and hot-reload.")
  d = serve_config.SERVE_DEFAULTS  # A flag overrides the config only when given.
  flags.DEFINE_string("host", d["host"], "Bind address (overrides serve.host).")
  flags.DEFINE_integer("port", d["port"], "Port (overrides serve.port).")
  flags.DEFINE_integer("max_batch", d["max_batch"], "KV-cache rows (overrides serve.max_batch).")
  flags.DEFINE_integer("max_len", d["max_len"], "Context length (overrides serve.max_len).")
  flags.DEFINE_integer("min_prefill_bucket", d["min_prefill_bucket"], "Shortest padded prefill "
                       "length (fewer compiled shapes when larger).")
  flags.DEFINE_integer("min_prefill_rows", d["min_prefill_rows"], "Fewest padded prefill rows "
                       "(max_batch = one compiled prefill shape).")
  flags.DEFINE_float("prefix_cache_mb", d["prefix_cache_mb"], "KV budget of automatic prefix "
                     "caching (reuses the K/V of a prompt's cached leading blocks; 0 = off; "
                     "overrides serve.*).")
  flags.DEFINE_enum("tool_parser", d["tool_parser"], ["", *tool_parsers.FAMILIES],
                    "Tool-call/reasoning parser family ('' = detect from the tokenizer dir; "
                    "overrides serve.tool_parser).")


def entry() -> None:
  """Console script `klong-serve`."""
  from absl import app
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

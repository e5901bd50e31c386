"""The inference server's `serve` section: its one table of defaults (no JAX; configs import it).

configs/serve_tiny.py builds its section from `serve_section`, the server fills a config's missing
fields from `serve_defaults`, and the server's and exporter's flags take their defaults from
`SERVE_DEFAULTS`, so a default is written once.
"""

from __future__ import annotations

from typing import Any

import ml_collections

SERVE_DEFAULTS: dict[str, Any] = dict(
    model_name="klong-model",  # Served name (the OpenAI `model` field).
    host="127.0.0.1",
    port=8000,  # 0 = pick a free port.
    max_batch=8,  # KV-cache rows = concurrent requests.
    max_len=512,  # Context length (prompt + completion).
    cache_dtype="float32",
    schedule="continuous",  # or "static".
    min_prefill_bucket=16,  # Prefill pads to powers of two >= this (bounds compiles).
    min_prefill_rows=1,  # = max_batch: one prefill shape, more compute per admission.
    max_body_bytes=4 << 20,
    reload_interval_s=2.0,  # Poll the policy dir for new versions (0 = only via admin).
    seed=0,  # Init seed when no policy exists yet.
    tokenizer="",  # Tokenizer file; "" = the bundled SentencePiece model.
    tokenizer_cache="/tmp/klong_tokenizer",
    tool_parser="",  # Tool-call/reasoning parser: klong|glm45|qwen3; "" = from the tokenizer dir.
    prefix_cache_mb=64,  # KV of prompts' leading blocks, reused by later prompts (0 = off).
    prefix_block=16,  # Tokens per cached block (prompts reuse whole blocks); paged: page size.
    engine="paged",  # "paged" (page pool, chunked prefill, k decode steps/call) | "dense" (ref).
    kv_pages=0,  # Paged: pool pages; 0 = max_batch full-length rows + prefix_cache_mb of pages.
    token_budget=256,  # Paged: tokens per step (decoding rows first, then prefill chunks).
    decode_steps=4,  # Paged: decode iterations per device call (on-device sampling and stops).
    paged_attention="auto",  # Paged: "auto" | "portable" (any backend) | "ragged" (TPU kernel).
    precompile=True,  # Paged: compile all step shapes at start-up (engine thread), not mid-serving.
    compile_cache_dir="",  # Persistent XLA compile cache directory ("" = off).
    replica_id=0,  # Mixed into the engine's seed sequence (requests without a `seed`).
)


def serve_defaults() -> ml_collections.ConfigDict:
  """A fresh `serve` section holding every default."""
  return ml_collections.ConfigDict(dict(SERVE_DEFAULTS))


def serve_section(**overrides: Any) -> ml_collections.ConfigDict:
  """The defaults with `overrides` (unknown field names fail, naming the valid ones)."""
  bad = sorted(set(overrides) - set(SERVE_DEFAULTS))
  if bad:
    raise KeyError(f"serve field(s) {bad} unknown; valid: {sorted(SERVE_DEFAULTS)}")
  section = serve_defaults()
  section.update(overrides)
  return section


def resolve(config: Any) -> ml_collections.ConfigDict:
  """The defaults updated with a config's `serve` section (if it has one)."""
  section = serve_defaults()
  if config is not None and "serve" in config:
    section.update(config.serve)
  return section

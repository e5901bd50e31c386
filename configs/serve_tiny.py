"""Serving config for the tiny preset (CPU): the `model` section plus `serve`.

Usage: python -m klong_jax.inference.server --config=configs/serve_tiny.py \
         --policy_dir=runs/demo/policy [--config.serve.port=8000]
Export a bundle: python -m klong_jax.inference.export --config=configs/serve_tiny.py --out=DIR
(arg: "preset=small,max_batch=16,max_len=1024" picks the model and the cache size).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ConfigDict with `model`, `mesh` and `serve` sections."""
  args = common.parse_arg(arg, preset="tiny", max_batch=8, max_len=512, port=8000)
  config = common.base_config(args.preset)
  config.serve = ml_collections.ConfigDict(dict(
      model_name=f"klong-{args.preset}",
      host="127.0.0.1",
      port=args.port,  # 0 = pick a free port.
      max_batch=args.max_batch,  # KV-cache rows = concurrent requests.
      max_len=args.max_len,  # Context length (prompt + completion).
      cache_dtype="float32",
      schedule="continuous",  # or "static".
      min_prefill_bucket=16,  # Prefill pads to powers of two >= this (bounds compiles).
      min_prefill_rows=1,  # = max_batch: one prefill shape, more compute per admission.
      max_body_bytes=4 << 20,
      reload_interval_s=2.0,  # Poll the policy dir for new versions (0 = only via admin).
      seed=0,  # Init seed when no policy exists yet.
      tokenizer="",  # Tokenizer file; "" = the bundled SentencePiece model.
      tokenizer_cache="/tmp/klong_tokenizer",
      prefix_cache_mb=64,  # KV of prompts' leading blocks, reused by later prompts (0 = off).
      prefix_block=16,  # Tokens per cached block (a prompt reuses whole blocks only).
  ))
  return config

"""Serving config for the tiny preset (CPU): the `model` section plus `serve`.

Usage: python -m klong_jax.inference.server --config=configs/serve_tiny.py \
         --policy_dir=runs/demo/policy [--config.serve.port=8000]
Export a bundle: python -m klong_jax.inference.export --config=configs/serve_tiny.py --out=DIR
(arg: "preset=small,max_batch=16,max_len=1024" picks the model and the cache size). The `serve`
fields and their defaults are klong_jax/inference/serve_config.py's one table.
"""

import ml_collections

from configs import common
from klong_jax.inference import serve_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ConfigDict with `model`, `mesh` and `serve` sections."""
  d = serve_config.SERVE_DEFAULTS
  args = common.parse_arg(arg, preset="tiny", max_batch=d["max_batch"], max_len=d["max_len"],
                          port=d["port"])
  config = common.base_config(args.preset)
  config.serve = serve_config.serve_section(
      model_name=f"klong-{args.preset}", port=args.port, max_batch=args.max_batch,
      max_len=args.max_len)
  return config

"""Serving config for GLM-4.5-Air on one TPU slice: bf16 weights and KV cache, serving mesh.

Usage (launch/tpu.py picks it for --config=configs/glm45_air.py; validate before start-up):
  python -m klong_jax.launch.plan --config=configs/serve_glm45_air.py:slice=v5p-8 \
      --topology=v5p-8 --step=serve
  python -m klong_jax.inference.server --config=configs/serve_glm45_air.py:slice=v5p-8 ...
(arg: "slice=v5p-16,max_batch=32,max_len=16384" overrides the slice's cache size.)

Weights are born bf16 (`param_dtype`; the sampler keeps router / expert bias / norms / biases
fp32, model/precision.py) and laid out by parallel/rules.SERVING_RULES: no FSDP, experts over
`expert`, heads / expert hidden / vocab over `tensor`, so a decode step gathers no weight. The
KV cache is bf16 (dense: max_batch x max_len slots per layer). Per-slice sizes: the rollout
context (max_len 32768) and a power-of-two row count whose decode step and prefill chunk the TPU
compiler's plan fits (docs/tpu_pod.md has the table):
  v5p-8  (4 chips x 95.74 GiB) expert 2 x tensor 2, 8 rows: weights 53.2 GiB, KV 11.5 GiB per chip
  v5p-16 (8 chips, 2 hosts)    expert 4 x tensor 2, 16 rows: weights 30.0 GiB, KV 11.5 GiB;
         one server process per host (launch/tpu.py --server_tpu=v5p-16: KLONG_* env, process 0
         serves HTTP and schedules, process 1 follows; inference/multihost.py)
  v6e-8  (8 chips x 31.25 GiB) tensor 8, 2 rows: weights 25.0 GiB, KV 1.4 GiB: the TPU compiler
         REFUSES both engines' steps (34.0-34.8 GiB of temporaries); not servable as configured
"""

import ml_collections

from configs import common
from klong_jax.inference import serve_config
from klong_jax.parallel import rules as rules_lib

# slice -> (mesh axis sizes, max_batch, max_len, engine). The mesh multiplies to the slice's
# chips; max_len = the rollout context (configs/rl_glm45_air.py seq_len 32768); max_batch = the
# most rows whose decode step AND prefill chunk the TPU compiler fits. engine: the one
# `plan --step=serve` compiled and fit there: the paged engine on v5p-8 / v5p-16 (pool over kv
# heads; 4-step decode 82.0 / 80.2 GiB per chip, 86% / 84%; docs/performance.md); v6e-8: the
# compiler refuses both engines (paged and dense: 34.0-34.8 GiB of temporaries vs 31.25 GiB of
# HBM, tpu_plans/serve_glm45_air_v6e8_paged.txt): kept as the record of that, not for use.
SLICES = {
    "v5p-8": (dict(expert=2, tensor=2), 8, 32768, "paged"),
    "v5p-16": (dict(expert=4, tensor=2), 16, 32768, "paged"),
    "v6e-8": (dict(tensor=8), 2, 32768, "dense"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ConfigDict with `model`, `mesh`, `rules` and `serve` sections for one slice."""
  args = common.parse_arg(arg, slice="v5p-8", max_batch=0, max_len=0,
                          port=serve_config.SERVE_DEFAULTS["port"])
  if args.slice not in SLICES:
    raise ValueError(f"slice={args.slice!r} has no serving config; use one of {sorted(SLICES)}")
  mesh, max_batch, max_len, engine = SLICES[args.slice]
  config = common.base_config("glm45_air", **{"fsdp": 1, **mesh})
  config.model.param_dtype = "bfloat16"  # Born bf16: fp32 weights (~424 GB) fit no slice.
  config.model.dtype = "bfloat16"
  config.rules = rules_lib.SERVING_RULES
  config.serve = serve_config.serve_section(
      model_name="klong-glm45_air", port=args.port, max_batch=args.max_batch or max_batch,
      max_len=args.max_len or max_len, cache_dtype="bfloat16",
      engine=engine,
      # Paged: 4 decode steps per device call (one host round trip per 4 tokens). The Sampler
      # places the expert gate/up stacks row-major (inference/weight_layout.py; TPU's default
      # puts their model dim minor, the grouped matmul reads the hidden dim minor), so XLA
      # hoists no relayout copy of them out of the step loop (without it: 128 GiB of
      # temporaries on v5p-8, refused). TPU plan, v5p-8 per chip: decode (8 rows x 4 steps)
      # inputs 79.07 GiB (704 padded to 768) + temp 2.94 = 82.0 GiB (86%), mixed step 79.5 GiB;
      # v5p-16 (16 rows): 80.2 / 77.7 GiB (84%). tpu_plans/serve_glm45_air_v5p{8,16}_paged_decode4.
      decode_steps=4)
  return config

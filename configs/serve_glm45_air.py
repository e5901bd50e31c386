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
context (max_len 32768) and the row count whose decode step and prefill chunk the TPU
compiler's plan fits (docs/tpu_pod.md has the table):
  v5p-8  (4 chips x 95.74 GiB) expert 2 x tensor 2, 8 rows: weights 53.2 GiB, KV 11.5 GiB per chip
  v5p-16 (8 chips, 2 hosts)    expert 4 x tensor 2, 16 rows: weights 30.0 GiB, KV 11.5 GiB;
         one server process per host (launch/tpu.py --server_tpu=v5p-16: KLONG_* env, process 0
         serves HTTP and schedules, process 1 follows; inference/multihost.py)
  v6e-8  (8 chips x 31.25 GiB) tensor 8, whole experts over it (SLICE_RULES), 6 rows: weights
         25.0 GiB, KV 4.3 GiB per chip (paged decode 29.7 GiB, 95%; 8 rows compile at 99.7%)
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
# paged engine, 6 rows (4-step decode and mixed step 29.7 GiB per chip, 95% of 31.25 GiB;
# tpu_plans/serve_glm45_air_v6e8_paged.txt). 8 rows compile at 31.17 GiB (99.7%,
# serve_glm45_air_v6e8_paged_rows8.txt): no headroom for the executables and runtime buffers.
SLICES = {
    "v5p-8": (dict(expert=2, tensor=2), 8, 32768, "paged"),
    "v5p-16": (dict(expert=4, tensor=2), 16, 32768, "paged"),
    "v6e-8": (dict(tensor=8), 6, 32768, "paged"),
}
# slice -> rules table, where not parallel/rules.SERVING_RULES. v6e-8 has one model axis: whole
# experts over `tensor` (SERVING_EXPERTS_OVER_TENSOR_RULES, 16 experts x 1408 per chip). Split 8
# ways, the expert hidden (176 per chip) is padded to 256 lanes in the gate/up stacks' row-major
# layout: 32.0 GiB of weights per chip as TPU lays them out (24.96 by their shapes), which the
# compiler refused ("HLO temporaries (34.04G)": the padded parameters + pool + 0.6 GiB).
SLICE_RULES = {"v6e-8": rules_lib.SERVING_EXPERTS_OVER_TENSOR_RULES}


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
  config.rules = SLICE_RULES.get(args.slice, rules_lib.SERVING_RULES)
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

"""Sampler throughput: decode tokens/s at batch 1/8/32 (tiny, small) and continuous vs static
batching on a mixed-length workload (same run, same compiled shapes).

Run: `python -m benchmarks.sampler [--presets=tiny,small] [--batches=1,8,32]`; writes
benchmarks/results/sampler.json. Decode tokens/s = rows x steps / time of `Sampler.decode` calls
with every row active (compile excluded). The batching comparison runs one request mix (a few
long generations among many short ones) through `Engine` with schedule="continuous" and
schedule="static" on the same sampler; ratio = static wall time / continuous wall time.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import _results
from klong_jax.inference.engine import Engine
from klong_jax.inference.sampler import RowSettings, Sampler, SamplingParams
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "model presets to measure")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "decode batch sizes")
_STEPS = flags.DEFINE_integer("steps", 40, "timed decode steps per batch size")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "KV-cache slots per row")
_REQUESTS = flags.DEFINE_integer("requests", 32, "requests in the mixed-length workload")
_OUT = flags.DEFINE_string("out", "benchmarks/results/sampler.json", "result JSON")


def decode_tokens_per_s(model: nnx.Module, batch: int, steps: int, max_len: int) -> float:
  """Rows x steps / seconds for `steps` jitted decode steps with all rows active."""
  sampler = Sampler(model, max_batch=batch, max_len=max_len)
  settings = RowSettings.empty(batch)
  settings.temperature[:] = 1.0
  tokens = np.ones(batch, np.int32)
  pos = np.full(batch, 16, np.int32)
  sampler.decode(tokens, pos, settings, np.zeros(batch, np.int32))  # Compile.
  start = time.perf_counter()
  for i in range(steps):
    tokens, _ = sampler.decode(tokens, pos + i, settings, np.full(batch, i, np.int32))
  return batch * steps / (time.perf_counter() - start)


def mixed_workload(n: int, max_len: int) -> tuple[list[list[int]], list[SamplingParams]]:
  """1 in 8 requests generates long (max_len/2 tokens); the rest 4-16 tokens."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, 400, size=int(rng.integers(4, 16))).tolist() for _ in range(n)]
  lengths = [max_len // 2 if i % 8 == 0 else int(rng.integers(4, 17)) for i in range(n)]
  return prompts, [SamplingParams(temperature=1.0, max_tokens=m, seed=i)
                   for i, m in enumerate(lengths)]


def batching_gain(model: nnx.Module, batch: int, max_len: int, n: int) -> dict[str, float]:
  sampler = Sampler(model, max_batch=batch, max_len=max_len, min_prefill_bucket=16,
                    min_prefill_rows=batch)
  prompts, params = mixed_workload(n, max_len)
  Engine(sampler).generate(prompts[:2], params[1:3])  # Compile prefill + decode.
  out: dict[str, float] = {}
  for schedule in ("static", "continuous"):
    engine = Engine(sampler, schedule=schedule)
    start = time.perf_counter()
    comps = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in comps)
    out[f"{schedule}_s"] = seconds
    out[f"{schedule}_tokens_per_s"] = tokens / seconds
    out[f"{schedule}_decode_steps"] = engine.stats["decode_steps_total"]
  out["continuous_over_static_speedup"] = out["static_s"] / out["continuous_s"]
  out["generated_tokens"] = tokens
  return out


def main(argv: list[str]) -> None:
  del argv
  result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "jax": jax.__version__, "max_len": _MAX_LEN.value,
            "decode_tokens_per_s": {}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  models = {}
  for preset in _PRESETS.value:
    models[preset] = Transformer(get_preset(preset), rngs=nnx.Rngs(0))
    for b in _BATCHES.value:
      tps = decode_tokens_per_s(models[preset], int(b), _STEPS.value, _MAX_LEN.value)
      result["decode_tokens_per_s"][f"{preset}/b{b}"] = round(tps, 1)
      print(f"{preset} batch {b}: {tps:.1f} decode tokens/s", flush=True)
  gain = batching_gain(models[_PRESETS.value[0]], 8, _MAX_LEN.value, _REQUESTS.value)
  result["batching"] = {"preset": _PRESETS.value[0], "max_batch": 8,
                        "requests": _REQUESTS.value, **{k: round(v, 3) for k, v in gain.items()}}
  print(json.dumps(result["batching"]), flush=True)
  _results.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

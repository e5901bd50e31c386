"""Decode cost vs max_len: the same requests served at max_len 1K and 8K by the paged engine and
by today's dense engine, in one run; plus the paged attention compiled for a TPU topology.

Run: `python -m benchmarks.paged_decode [--requests=4] [--prompt=96] [--new=64]`; writes
benchmarks/results/paged_decode.json. For each engine and max_len: wall time of the decode-heavy
generation (best of `repeats`, variants interleaved, after a warm-up pass that compiles every
shape) and the compiled
decode call's memory (XLA memory_analysis: argument + temp bytes, CPU). The paged pool has the
same page count at both lengths (pages for the requests' real lengths), so its ratios 8K/1K
should be ~1; the dense cache is [layers, batch, max_len] and its decode reads every slot.
Tokens must match across lengths and engines (checked). With libtpu installed, the TPU kernel
(`ragged_paged_attention`) is compiled for v5p at both lengths with the same pool: temp bytes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import _results
from benchmarks._paged_tpu import tpu_compile_attention, tpu_compile_decode
from klong_jax.inference.engine import Engine
from klong_jax.inference.paged import model as paged_model
from klong_jax.inference.paged.engine import PagedEngine
from klong_jax.inference.sampler import Sampler, SamplingParams, _decode_step
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset")
_REQUESTS = flags.DEFINE_integer("requests", 4, "concurrent requests (= max_batch)")
_PROMPT = flags.DEFINE_integer("prompt", 96, "prompt tokens per request")
_NEW = flags.DEFINE_integer("new", 192, "generated tokens per request")
_LENS = flags.DEFINE_list("max_lens", ["1024", "8192"], "context lengths compared")
_PAGE = flags.DEFINE_integer("page", 16, "page size")
_STEPS = flags.DEFINE_integer("decode_steps", 4, "paged decode steps per device call")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed passes (best kept)")
_TPU = flags.DEFINE_bool("tpu", True, "also compile for a TPU topology (needs libtpu)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/paged_decode.json", "result JSON")
_NOTE = flags.DEFINE_string("note", "", "free text stored with the result (e.g. machine load)")


def _memory(fn: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
  mem = fn.lower(*args, **kwargs).compile().memory_analysis()
  return {"argument_bytes": int(mem.argument_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes)}


def generate(engine: Engine, prompts: list[list[int]], sp: SamplingParams) -> tuple[float, list]:
  start = time.perf_counter()
  out = engine.generate(prompts, sp)
  return time.perf_counter() - start, [c.token_ids for c in out]


def main(argv: list[str]) -> None:
  del argv
  load_before = os.getloadavg()
  cfg = get_preset(_PRESET.value)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  b, page = _REQUESTS.value, _PAGE.value
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, cfg.vocab_size, _PROMPT.value).tolist() for _ in range(b)]
  sp = SamplingParams(temperature=0.0, max_tokens=_NEW.value)
  pages = b * -(-(_PROMPT.value + _NEW.value) // page) + 1  # The requests' real lengths.
  rows: dict[str, dict[str, Any]] = {}
  engines: dict[str, Engine] = {}
  for max_len in (int(x) for x in _LENS.value):
    ps = Sampler(model, max_batch=b, max_len=max_len, dense_cache=False)
    # No prefix caching: every repeat recomputes its prompts, as the dense engine does.
    paged = PagedEngine(ps, page_size=page, num_pages=pages, decode_steps=_STEPS.value,
                        token_budget=max(256, b), prefix_caching=False)
    paged.precompile()  # As the server does at start-up.
    engines[f"paged_{max_len}"] = paged
    mem = _memory(paged_model.decode_steps, ps.graphdef, ps.params, ps.rest, paged.pool,
                  paged._decode_state([]), steps=_STEPS.value, **paged._static())
    rows[f"paged_{max_len}"] = {"pool_bytes": paged.pool_bytes, **mem}
    ds = Sampler(model, max_batch=b, max_len=max_len, min_prefill_bucket=128)
    engines[f"dense_{max_len}"] = Engine(ds)
    z = np.zeros(b, np.int32)
    mem = _memory(_decode_step, ds.graphdef, ds.params, ds.rest, ds.cache, z, z,
                  np.zeros(b, np.float32), z, np.ones(b, np.float32), z.astype(np.uint32), z)
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ds.cache))
    rows[f"dense_{max_len}"] = {"cache_bytes": int(cache_bytes), **mem}
  tokens: dict[str, list] = {}
  for name, engine in engines.items():  # Warm-up: compiles every shape.
    _, tokens[name] = generate(engine, prompts, sp)
  times: dict[str, list[float]] = {name: [] for name in engines}
  for _ in range(_REPEATS.value):  # Variants interleaved: load drifts hit all alike.
    for name, engine in engines.items():
      secs, toks = generate(engine, prompts, sp)
      times[name].append(round(secs, 4))
      assert toks == tokens[name]
  for name in engines:
    rows[name]["seconds"] = min(times[name])
    rows[name]["seconds_per_repeat"] = times[name]
    print(name, rows[name], flush=True)
  first = next(iter(tokens.values()))
  same = all(t == first for t in tokens.values())
  if not same:
    raise SystemExit("engines / max_lens sampled different tokens (run "
                     "tests/inference/test_paged_engine.py)")
  lo, hi = (int(x) for x in _LENS.value[:2])

  def ratio(kind: str, field: str) -> float:
    return round(rows[f"{kind}_{hi}"][field] / rows[f"{kind}_{lo}"][field], 3)

  result: dict[str, Any] = {
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "note": _NOTE.value,
      "workload": {"preset": _PRESET.value, "requests": b, "prompt_tokens": _PROMPT.value,
                   "new_tokens": _NEW.value, "page": page, "pool_pages": pages,
                   "decode_steps": _STEPS.value, "max_lens": [lo, hi]},
      "same_tokens": same, "runs": rows,
      "paged_time_ratio_hi_lo": ratio("paged", "seconds"),
      "paged_time_ratio_per_repeat": [round(h / lo_, 3) for h, lo_ in zip(
          rows[f"paged_{hi}"]["seconds_per_repeat"], rows[f"paged_{lo}"]["seconds_per_repeat"],
          strict=True)],
      "paged_decode_bytes_ratio_hi_lo": round(
          (rows[f"paged_{hi}"]["argument_bytes"] + rows[f"paged_{hi}"]["temp_bytes"]) /
          (rows[f"paged_{lo}"]["argument_bytes"] + rows[f"paged_{lo}"]["temp_bytes"]), 3),
      "dense_time_ratio_hi_lo": ratio("dense", "seconds"),
      "dense_decode_bytes_ratio_hi_lo": round(
          (rows[f"dense_{hi}"]["argument_bytes"] + rows[f"dense_{hi}"]["temp_bytes"]) /
          (rows[f"dense_{lo}"]["argument_bytes"] + rows[f"dense_{lo}"]["temp_bytes"]), 3),
  }
  try:
    if not _TPU.value:
      raise ImportError("--notpu")
    import libtpu  # noqa: F401
    result["tpu_ragged_attention"] = [tpu_compile_attention(n) for n in (lo, hi)]
    result["tpu_paged_decode_call"] = [tpu_compile_decode(n) for n in (lo, hi)]
  except ImportError as e:
    result["tpu_ragged_attention"] = result["tpu_paged_decode_call"] = f"skipped: {e}"
  result["summary"] = [
      {"metric": f"paged decode wall time, max_len {hi}", "value": rows[f"paged_{hi}"]["seconds"],
       "unit": "s", "baseline": f"paged, max_len {lo}",
       "baseline_value": rows[f"paged_{lo}"]["seconds"]},
      {"metric": f"dense decode wall time, max_len {hi}", "value": rows[f"dense_{hi}"]["seconds"],
       "unit": "s", "baseline": f"dense, max_len {lo}",
       "baseline_value": rows[f"dense_{lo}"]["seconds"]}]
  print(json.dumps({k: v for k, v in result.items() if "ratio" in k}), flush=True)
  _results.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

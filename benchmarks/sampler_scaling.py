"""Decode batch scaling: ms/step and tokens/s vs batch and max_len, before and after the in-place
KV-cache fix, in the same process, interleaved.

Run: `python -m benchmarks.sampler_scaling [--presets=tiny] [--batches=1,8,16,32]
[--max_lens=256,1024]`; writes benchmarks/results/sampler_scaling.json.

Variants (each its own jitted decode step over the same weights, cache donated, sampling and
top-logprobs included, exactly what `Sampler.decode` runs):
  * "before": the decoder as it was (_legacy_decode.py): per-layer cache slices as scan
    inputs/outputs, written back with `.at[nd:].set`. XLA:CPU copies the whole cache several
    times per step (63 MB of temp buffers for a 25 MB cache at batch 32, max_len 1024).
  * "after": the shipped `Transformer.decode`: the whole cache is scan carry, each layer scatters
    its new K/V into it in place and reads its own slice.
Timings: `rounds` rounds; each round runs `steps` decode steps of every (variant, batch,
max_len) in turn; the median per-step time over rounds is kept (the box is shared, so medians of
interleaved rounds, and ratios between variants of the same round, are what to read). The first
step of each variant is checked to sample the same tokens as "before" with close logprobs.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import _legacy_decode as legacy_decode
from benchmarks import _results
from klong_jax.inference import sampler as sampler_lib
from klong_jax.inference import sampling
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer

_PRESETS = flags.DEFINE_list("presets", ["tiny"], "model presets")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "16", "32"], "decode batch sizes")
_MAX_LENS = flags.DEFINE_list("max_lens", ["256", "1024"], "KV-cache slots per row")
_VARIANTS = flags.DEFINE_list("variants", ["before", "after"], "decoders to compare")
_STEPS = flags.DEFINE_integer("steps", 10, "decode steps per measurement")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "interleaved rounds (median kept)")
_NOTE = flags.DEFINE_string("note", "", "free text stored with the result (e.g. machine load)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/sampler_scaling.json", "result JSON")


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _step(variant: str, graphdef: Any, params: Any, rest: Any, cache: Any, tokens: jax.Array,
          positions: jax.Array, temp: jax.Array, top_k: jax.Array, top_p: jax.Array,
          seeds: jax.Array, counters: jax.Array) -> tuple[Any, ...]:
  model = nnx.merge(graphdef, params, rest)
  tok, pos = tokens[:, None], positions[:, None]
  if variant == "before":
    logits, cache = legacy_decode.decode(model, tok, pos, cache)
  else:
    logits, cache = model.decode(tok, pos, cache)
  toks, lps = sampling.sample(logits[:, 0], temp, top_k, top_p, seeds, counters)
  return toks, lps, sampler_lib._top_logprobs(logits[:, 0], temp, top_k, top_p), cache


class Runner:
  """One variant at one (batch, max_len): its own cache, stepped like `Sampler.decode`."""

  def __init__(self, variant: str, model: nnx.Module, batch: int, max_len: int):
    self.variant, self.batch = variant, batch
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Not(nnx.RngState), ...)
    self.cache = jax.jit(lambda: model.init_cache(batch=batch, max_len=max_len))()
    self.settings = sampler_lib.RowSettings.empty(batch)
    self.settings.temperature[:] = 1.0
    self.tokens = np.ones(batch, np.int32)
    self.pos = 16

  def step(self) -> tuple[np.ndarray, np.ndarray]:
    s = self.settings
    toks, lps, _, self.cache = _step(
        self.variant, self.graphdef, self.params, self.rest, self.cache, self.tokens,
        np.full(self.batch, self.pos, np.int32), s.temperature, s.top_k, s.top_p, s.seed,
        np.full(self.batch, self.pos, np.int32))
    self.tokens = np.asarray(toks)  # The host sync every engine step has.
    self.pos += 1
    return self.tokens, np.asarray(lps)

  def time_steps(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    return (time.perf_counter() - start) / steps


def measure(model: nnx.Module, variants: list[str], batches: list[int], max_lens: list[int],
            steps: int, rounds: int) -> dict[str, Any]:
  runners = {(v, b, n): Runner(v, model, b, n) for n in max_lens for b in batches
             for v in variants}
  first = {k: r.step() for k, r in runners.items()}  # Compile; check agreement.
  for (v, b, n), (toks, lps) in first.items():
    ref_toks, ref_lps = first[(variants[0], b, n)]
    if not np.array_equal(toks, ref_toks) or np.max(np.abs(lps - ref_lps)) > 1e-4:
      raise SystemExit(f"variant {v} (b{b}, max_len {n}) disagrees with {variants[0]}")
  per_step: dict[tuple[str, int, int], list[float]] = {k: [] for k in runners}
  for _ in range(rounds):
    for k, r in runners.items():
      per_step[k].append(r.time_steps(steps))
  rows = []
  for (v, b, n), ts in per_step.items():
    ms = statistics.median(ts) * 1e3
    rows.append({"variant": v, "batch": b, "max_len": n, "ms_per_step": round(ms, 3),
                 "min_ms_per_step": round(min(ts) * 1e3, 3),
                 "tokens_per_s": round(b / ms * 1e3, 1)})
  return {"rows": rows}


def main(argv: list[str]) -> None:
  del argv
  load_before = os.getloadavg()
  batches = [int(b) for b in _BATCHES.value]
  max_lens = [int(n) for n in _MAX_LENS.value]
  result: dict[str, Any] = {
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": _NOTE.value,
      "steps": _STEPS.value, "rounds": _ROUNDS.value, "presets": {}}
  summary = []
  for preset in _PRESETS.value:
    model = Transformer(get_preset(preset), rngs=nnx.Rngs(0))
    res = measure(model, _VARIANTS.value, batches, max_lens, _STEPS.value, _ROUNDS.value)
    result["presets"][preset] = res
    by = {(r["variant"], r["batch"], r["max_len"]): r for r in res["rows"]}
    for r in res["rows"]:
      print(f"{preset} {r['variant']:>6} b{r['batch']:<3} max_len {r['max_len']:<5} "
            f"{r['ms_per_step']:8.2f} ms/step {r['tokens_per_s']:9.0f} tok/s", flush=True)
      base = by.get(("before", r["batch"], r["max_len"]))
      if r["variant"] == "after" and base:
        summary.append({"metric": f"{preset} decode tokens/s, batch {r['batch']}, max_len "
                                  f"{r['max_len']}", "value": r["tokens_per_s"], "unit": "tok/s",
                        "baseline": "before (cache copied per step)",
                        "baseline_value": base["tokens_per_s"]})
  result["summary"] = summary
  result["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
  _results.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

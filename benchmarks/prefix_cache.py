"""Prefix caching on a multi-turn agent workload: prefill tokens computed and wall time, with and
without KV reuse, in the same run on the same sampler, and the paged engine (shared prefix pages,
chunked prefill, multi-step decode; inference/paged/) on the same weights with the same memory
(pages for max_batch full rows + the prefix budget).

Run: `python -m benchmarks.prefix_cache [--turns=48] [--group=4]`; writes
benchmarks/results/prefix_cache.json. The workload is what a rollout group sends the server: a
group of `group` agents on one task, each turn every member asks for a reply to the shared fixed
prefix (task + paper, `prefix` tokens) plus its own history window, then gets a tool result
(`tool` tokens). Windows follow the real context policy (data/context.py: max_len, overlap, the
reply budget), so the history slides as it outgrows the context, as in a long-horizon episode.
Both engines sample with the same seeds; the cached run must return the same tokens (checked), so
the ratios compare equal work. Timings are the best of `repeats` after one untimed warm-up pass
of each (compiles excluded).
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
from klong_jax.data.context import ContextPolicy
from klong_jax.inference.engine import Engine
from klong_jax.inference.paged.engine import PagedEngine, default_num_pages
from klong_jax.inference.prefix_cache import PrefixCache
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset")
_TURNS = flags.DEFINE_integer("turns", 48, "agent turns per member")
_GROUP = flags.DEFINE_integer("group", 4, "rollout group size (members share the prefix)")
_PREFIX = flags.DEFINE_integer("prefix", 400, "fixed-prefix tokens (task + paper)")
_TOOL = flags.DEFINE_integer("tool", 40, "tool-result tokens per turn")
_REPLY = flags.DEFINE_integer("reply", 24, "reply budget (max_tokens) per turn")
_MAX_LEN = flags.DEFINE_integer("max_len", 1024, "context = KV-cache slots per row")
_OVERLAP = flags.DEFINE_integer("overlap", 96, "context-policy overlap")
_BLOCK = flags.DEFINE_integer("block", 16, "prefix-cache block tokens")
_BUDGET_MB = flags.DEFINE_float("budget_mb", 64.0, "prefix-cache KV budget")
_STEPS = flags.DEFINE_integer("decode_steps", 4, "paged engine: decode steps per device call")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed passes per variant (best is kept)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/prefix_cache.json", "result JSON")
_NOTE = flags.DEFINE_string("note", "", "free text stored with the result (e.g. machine load)")


def run_group(engine: Engine, policy: ContextPolicy, turns: int, group: int, prefix_len: int,
              tool_len: int, reply: int, vocab: int) -> dict[str, Any]:
  """One group's episode through `engine`; returns the replies and the engine's counters."""
  rng = np.random.default_rng(0)
  prefix = rng.integers(10, vocab, prefix_len).tolist()
  histories: list[list[list[int]]] = [[] for _ in range(group)]  # Messages' token ids.
  is_tool: list[list[bool]] = [[] for _ in range(group)]
  window = [0] * group
  replies, slides = [], 0
  before = dict(engine.stats)
  start = time.perf_counter()
  for turn in range(turns):
    prompts = []
    for m in range(group):
      msgs = histories[m]
      starts = np.cumsum([0] + [len(x) for x in msgs]).tolist()
      w = policy.window_start(prefix_len, starts, [not t for t in is_tool[m]] + [True],
                              window[m], len(msgs))
      slides += w != window[m]
      window[m] = w
      prompts.append(prefix + [t for x in msgs[window[m]:] for t in x])
    params = [SamplingParams(temperature=1.0, max_tokens=reply, seed=1000 * turn + m)
              for m in range(group)]
    comps = engine.generate(prompts, params)
    for m, c in enumerate(comps):
      replies.append(c.token_ids)
      histories[m].append([1] + c.token_ids + [2])  # Role header + reply + end of turn.
      is_tool[m].append(False)
      histories[m].append(rng.integers(10, vocab, tool_len).tolist())
      is_tool[m].append(True)
  seconds = time.perf_counter() - start
  stats = {k: v - before.get(k, 0) for k, v in engine.stats.items()}
  return {"seconds": seconds, "replies": replies, "window_slides": slides,
          "prompt_tokens": stats.get("prompt_tokens_total", 0),
          "prefill_tokens": stats.get("prefill_tokens_total", 0),
          "hit_tokens": stats.get("prefix_cache_hit_tokens_total", 0),
          "evicted_blocks": stats.get("prefix_cache_evicted_blocks_total", 0)}


def main(argv: list[str]) -> None:
  del argv
  load_before = os.getloadavg()
  cfg = get_preset(_PRESET.value)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  sampler = Sampler(model, max_batch=_GROUP.value, max_len=_MAX_LEN.value,
                    min_prefill_bucket=64)
  policy = ContextPolicy(_MAX_LEN.value, _OVERLAP.value, _REPLY.value)
  policy.check_prefix(_PREFIX.value)
  cache = PrefixCache(sampler, block_size=_BLOCK.value,
                      max_bytes=int(_BUDGET_MB.value * (1 << 20)))
  paged_sampler = Sampler(model, max_batch=_GROUP.value, max_len=_MAX_LEN.value,
                          dense_cache=False)
  paged = PagedEngine(paged_sampler, page_size=_BLOCK.value, decode_steps=_STEPS.value,
                      num_pages=default_num_pages(paged_sampler, _BLOCK.value, _BUDGET_MB.value))
  engines = {"uncached": Engine(sampler), "cached": Engine(sampler, prefix_cache=cache),
             "paged": paged}
  args = (policy, _TURNS.value, _GROUP.value, _PREFIX.value, _TOOL.value, _REPLY.value,
          cfg.vocab_size)
  runs: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
  for engine in engines.values():  # Warm-up: compiles every prefill/copy shape.
    run_group(engine, *args)
  for _ in range(_REPEATS.value):
    for name, engine in engines.items():
      cache.clear(sampler.policy_version)  # Each cached pass starts cold, like a new group.
      paged.alloc.clear(paged_sampler.policy_version)
      runs[name].append(run_group(engine, *args))
      print(f"{name}: {runs[name][-1]['seconds']:.2f}s, prefill "
            f"{runs[name][-1]['prefill_tokens']} of {runs[name][-1]['prompt_tokens']} prompt "
            "tokens", flush=True)
  same = all(a["replies"] == b["replies"] == c["replies"] for a, b, c in zip(
      runs["cached"], runs["uncached"], runs["paged"], strict=True))
  if not same:
    raise SystemExit("cached, uncached and paged engines sampled different tokens (run "
                     "tests/inference/test_prefix_cache.py and test_paged_engine.py)")
  best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
  result = {
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "note": _NOTE.value,
      "workload": {"preset": _PRESET.value, "turns": _TURNS.value, "group": _GROUP.value,
                   "prefix_tokens": _PREFIX.value, "tool_tokens": _TOOL.value,
                   "reply_tokens": _REPLY.value, "max_len": _MAX_LEN.value,
                   "overlap": _OVERLAP.value, "requests": _TURNS.value * _GROUP.value,
                   "block": _BLOCK.value, "budget_mb": _BUDGET_MB.value,
                   "cache_blocks": cache.num_blocks, "paged_pages": paged.alloc.num_pages,
                   "paged_decode_steps": _STEPS.value},
      "same_tokens": same,
      **{k: {f: v for f, v in r.items() if f != "replies"} for k, r in best.items()},
      "prefill_tokens_ratio": best["uncached"]["prefill_tokens"] /
                              max(1, best["cached"]["prefill_tokens"]),
      "wall_speedup": best["uncached"]["seconds"] / best["cached"]["seconds"],
      "paged_wall_speedup_vs_cached": best["cached"]["seconds"] / best["paged"]["seconds"],
      "paged_wall_speedup_vs_uncached": best["uncached"]["seconds"] / best["paged"]["seconds"],
      "paged_wall_speedup_vs_cached_per_repeat": [
          round(c["seconds"] / p["seconds"], 3) for c, p in zip(runs["cached"], runs["paged"],
                                                                strict=True)],
      # Paired ratios (the two variants of one repeat ran back to back): the spread shows how
      # much the machine's load moved the wall times.
      "wall_speedup_per_repeat": [round(u["seconds"] / c["seconds"], 3) for u, c in
                                  zip(runs["uncached"], runs["cached"], strict=True)],
  }
  u, c = best["uncached"], best["cached"]
  result["summary"] = [  # Rows for benchmarks/run_all's table: figure beside its baseline.
      {"metric": "prefill tokens computed, prefix cache", "value": c["prefill_tokens"],
       "unit": "tok", "baseline": "no prefix cache", "baseline_value": u["prefill_tokens"]},
      {"metric": "multi-turn group wall time, prefix cache", "value": round(c["seconds"], 3),
       "unit": "s", "baseline": "no prefix cache", "baseline_value": round(u["seconds"], 3)},
      {"metric": "multi-turn group wall time, paged engine", "unit": "s",
       "value": round(best["paged"]["seconds"], 3), "baseline": "dense engine + prefix cache",
       "baseline_value": round(c["seconds"], 3)}]
  print(json.dumps({k: result[k] for k in ("prefill_tokens_ratio", "wall_speedup",
                                           "paged_wall_speedup_vs_cached")}), flush=True)
  _results.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

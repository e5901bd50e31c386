"""MoE expert-compute throughput (dense reference vs dropless paths) and preset forward speed.

  .venv/bin/python benchmarks/moe.py [--tokens=2048] [--out=benchmarks/results/moe.json]

Times jit-compiled forward (and forward+grad) of each dropless path against the dense one-hot
reference at E=64, k=8 (H=256, F=128, fp32), then forward tokens/s of the tiny and small presets.
Writes JSON (atomically) with absolute numbers and ratios vs the dense reference from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _results, _timing  # noqa: E402
from klong_jax.model import moe_dispatch  # noqa: E402
from klong_jax.model.config import get_preset  # noqa: E402
from klong_jax.model.transformer import Transformer  # noqa: E402


def bench_paths(tokens: int, experts: int, top_k: int, hidden: int, ffn: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (tokens, hidden))
  logits = jax.random.normal(keys[1], (tokens, experts))
  _, idx = jax.lax.top_k(logits, top_k)
  w = jax.nn.softmax(jnp.take_along_axis(logits, idx, -1))
  wg = jax.random.normal(keys[3], (experts, hidden, ffn)) * 0.05
  wu = jax.random.normal(keys[4], (experts, hidden, ffn)) * 0.05
  wd = jax.random.normal(keys[5], (experts, ffn, hidden)) * 0.05
  paths = {"dense": ("dense", 0), "ragged": ("ragged", 0), "blocked_b32": ("blocked", 32),
           "blocked_b64": ("blocked", 64), "blocked_b128": ("blocked", 128)}
  results = {}
  for name, (impl, block) in paths.items():
    fwd = jax.jit(lambda x, idx, w, wg, wu, wd, impl=impl, block=block:
                  moe_dispatch.local_experts(impl, x, idx, w, wg, wu, wd, 0, block or 64))
    grad = jax.jit(jax.grad(lambda x, idx, w, wg, wu, wd, f=fwd: jnp.sum(
        f(x, idx, w, wg, wu, wd) ** 2), argnums=(0, 3, 4, 5)))
    args = (x, idx, w, wg, wu, wd)  # idx is an argument so the routing sort is timed too.
    t_fwd = _timing.best_time(fwd, *args, repeats=5)
    t_grad = _timing.best_time(grad, *args, repeats=3)
    results[name] = {"fwd_s": t_fwd, "fwd_tokens_per_s": tokens / t_fwd,
                     "fwd_grad_s": t_grad, "fwd_grad_tokens_per_s": tokens / t_grad}
    print(f"{name:14s} fwd {t_fwd * 1e3:8.2f} ms  fwd+grad {t_grad * 1e3:8.2f} ms", flush=True)
  dense = results["dense"]
  for r in results.values():
    r["fwd_speedup_vs_dense"] = dense["fwd_s"] / r["fwd_s"]
    r["fwd_grad_speedup_vs_dense"] = dense["fwd_grad_s"] / r["fwd_grad_s"]
  return results


def bench_preset(name: str, batch: int, length: int) -> dict:
  cfg = get_preset(name)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  fwd = nnx.jit(lambda m, t, p: m(t, p)[0])
  seconds = _timing.best_time(fwd, model, tokens, positions, repeats=3)
  print(f"{name:6s} forward {batch}x{length}: {batch * length / seconds:,.0f} tokens/s", flush=True)
  return {"batch": batch, "length": length, "fwd_s": seconds,
          "fwd_tokens_per_s": batch * length / seconds, "moe_impl": cfg.moe_impl}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "moe.json"))
  args = parser.parse_args()
  shape = dict(tokens=args.tokens, experts=64, top_k=8, hidden=256, ffn=128)
  report = {
      "benchmark": "moe", "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind), "host": platform.node(),
      "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "expert_paths": {"shape": shape, "dtype": "float32", "results": bench_paths(**shape)},
      "presets": {"tiny": bench_preset("tiny", 8, 128), "small": bench_preset("small", 8, 128)},
  }
  _results.write_json(args.out, report, indent=2)


if __name__ == "__main__":
  main()

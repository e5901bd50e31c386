"""MoE dispatch and grouped matmul, from the real TPU compiler (libtpu, no TPU needed) and on CPU.

  .venv/bin/python benchmarks/moe_dispatch.py [--out=benchmarks/results/moe_dispatch.json]
      [--skip_tpu] [--cpu_tokens=4096]

1. Grouped matmul for TPU: `jax.lax.ragged_dot` vs megablox `gmm` in the local expert compute
   (`moe_dispatch.local_experts`), glm45_air expert shapes (D=4096, F=1408, 16 local experts,
   8192 tokens x top-8 per chip, bf16), forward+backward compiled for one v5p chip: temp bytes
   and HLO flops (cost_analysis) against the matmuls' own flops.
2. The MoE layer (`moe.routed_experts`, forward+backward) for v5p:2x2x1 (4 chips, expert=4):
   all-to-all vs all-gather dispatch; the collectives in each compiled HLO with their bytes.
3. Expected bytes each dispatch moves per chip for glm45_air routing (E=128, top-8) at expert
   parallelism 4/8/16, uniform routing (the all-to-all is data dependent).
4. CPU wall time of both dispatches on 8 fake devices (expert=8), forward and forward+grad.
TPU numbers need libtpu (`pip install "jax[tpu]"`); recipe in launch/tpu_topology.py.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile only; others may hold libtpu.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _results, _timing  # noqa: E402
from klong_jax.model import moe_dispatch  # noqa: E402
from klong_jax.model.moe import routed_experts  # noqa: E402
from klong_jax.parallel.mesh import make_mesh  # noqa: E402

GLM = dict(hidden=4096, ffn=1408, experts=128, top_k=8)
_COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
                "collective-permute")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "s64": 8, "f64": 8}


def _tpu_devices(topology: str = "v5p:2x2x1") -> list:
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  return list(topo.devices)


def _shape_bytes(text: str) -> int:
  """Bytes of the largest array in an HLO result type like `(bf16[4,8]{1,0}, s32[4])`."""
  best = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
    if dtype in _BYTES:
      best = max(best, _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return best


def collectives(hlo: str) -> list[dict]:
  """Every collective op in a compiled HLO module: kind, result type, bytes (largest array)."""
  ops = []
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if m:
      ops.append({"op": m.group(2), "type": m.group(1)[:160], "bytes": _shape_bytes(m.group(1))})
  return ops


def _summary(ops: list[dict]) -> dict:
  out: dict = {}
  for op in ops:
    entry = out.setdefault(op["op"], {"count": 0, "bytes": 0, "largest_bytes": 0})
    entry["count"] += 1
    entry["bytes"] += op["bytes"]
    entry["largest_bytes"] = max(entry["largest_bytes"], op["bytes"])
  return out


def _compile_stats(compiled, seconds: float) -> dict:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"compile_s": round(seconds, 1), "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "flops": float(cost.get("flops", -1)), "bytes_accessed": float(cost.get(
              "bytes accessed", -1))}


def _routing(key, tokens: int, experts: int, top_k: int) -> tuple[jax.Array, jax.Array]:
  logits = jax.random.normal(key, (tokens, experts))
  w, idx = jax.lax.top_k(jax.nn.softmax(logits), top_k)
  return idx.astype(jnp.int32), w


def tpu_grouped_matmul(devices: list, tokens: int = 8192, local_experts: int = 16) -> dict:
  """ragged_dot vs megablox gmm for one v5p chip, fwd+bwd."""
  d, f, k = GLM["hidden"], GLM["ffn"], GLM["top_k"]
  mesh = jax.make_mesh((1,), ("x",), devices=devices[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  rep = jax.sharding.NamedSharding(mesh, jax.P())
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  args = (spec((tokens, d), jnp.bfloat16), spec((tokens, k), jnp.int32),
          spec((tokens, k), jnp.float32), spec((local_experts, d, f), jnp.bfloat16),
          spec((local_experts, d, f), jnp.bfloat16), spec((local_experts, f, d), jnp.bfloat16))
  matmul_flops = 3 * 2 * tokens * k * d * f  # Forward; backward is twice that.
  results = {"shape": {"tokens": tokens, "top_k": k, "rows": tokens * k, "hidden": d, "ffn": f,
                       "local_experts": local_experts, "dtype": "bfloat16"},
             "matmul_flops_fwd_bwd": 3 * matmul_flops}
  for impl in ("ragged", "gmm"):
    def loss(x, idx, w, wg, wu, wd, impl=impl):
      y = moe_dispatch.local_experts(impl, x, idx, w, wg, wu, wd, 0, 128)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5))).lower(*args).compile()
    stats = _compile_stats(compiled, time.perf_counter() - start)
    stats["flops_vs_matmuls"] = stats["flops"] / results["matmul_flops_fwd_bwd"]
    results[impl] = stats
    print(f"grouped matmul {impl:8s} temp {stats['temp_bytes'] / 2**30:7.2f} GiB  "
          f"flops {stats['flops']:.3e} ({stats['flops_vs_matmuls']:.2f}x matmuls)  "
          f"compile {stats['compile_s']} s", flush=True)
  return results


def tpu_layer(devices: list, impl: str, tokens_per_chip: int = 2048, experts: int = 64) -> dict:
  """routed_experts fwd+bwd for v5p:2x2x1 with expert=4: a2a vs all-gather HLO collectives."""
  d, f, k = GLM["hidden"], GLM["ffn"], GLM["top_k"]
  mesh = make_mesh({"expert": 4}, devices=devices)
  n = tokens_per_chip * 4
  tok = jax.sharding.NamedSharding(mesh, jax.P("expert"))
  wsh = jax.sharding.NamedSharding(mesh, jax.P("expert"))
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=tok),
          jax.ShapeDtypeStruct((n, k), jnp.int32, sharding=tok),
          jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=tok),
          jax.ShapeDtypeStruct((experts, d, f), jnp.bfloat16, sharding=wsh),
          jax.ShapeDtypeStruct((experts, d, f), jnp.bfloat16, sharding=wsh),
          jax.ShapeDtypeStruct((experts, f, d), jnp.bfloat16, sharding=wsh))
  results = {"mesh": "v5p:2x2x1 expert=4", "tokens_per_chip": tokens_per_chip,
             "experts": experts, "top_k": k, "hidden": d, "ffn": f, "impl": impl,
             "x_shard_bytes": tokens_per_chip * d * 2}
  for dispatch in ("a2a", "allgather"):
    def loss(*a, dispatch=dispatch):
      y, _ = routed_experts(*a, impl=impl, block_size=128, dispatch=dispatch, exchange="ragged")
      return jnp.sum(y.astype(jnp.float32) ** 2)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5))).lower(*args).compile()
    stats = _compile_stats(compiled, time.perf_counter() - start)
    ops = collectives(compiled.as_text())
    stats["collectives"] = _summary(ops)
    stats["collective_ops"] = ops
    results[dispatch] = stats
    print(f"layer {impl} {dispatch:9s} temp {stats['temp_bytes'] / 2**30:6.2f} GiB  "
          f"collectives {stats['collectives']}", flush=True)
  return results


def expected_bytes(tokens_per_chip: int = 8192) -> dict:
  """Per-chip bytes each way (bf16 rows of D) for uniform top-k routing over E experts."""
  d, e, k = GLM["hidden"], GLM["experts"], GLM["top_k"]
  out = {}
  for g in (4, 8, 16):
    local = e // g
    p_none = math.comb(e - local, k) / math.comb(e, k)  # A device holds none of a token's k.
    remote_pairs = (g - 1) * (1 - p_none)  # Other devices a token is sent to.
    row = d * 2
    out[f"expert{g}"] = {
        "allgather_bytes_each_way": (g - 1) * tokens_per_chip * row,
        "a2a_token_pairs_bytes_each_way": remote_pairs * tokens_per_chip * row,
        "a2a_per_copy_bytes_each_way": k * (g - 1) / g * tokens_per_chip * row,
        "a2a_over_allgather": remote_pairs / (g - 1)}
  return {"tokens_per_chip": tokens_per_chip, "hidden": d, "experts": e, "top_k": k, **out}



def cpu_dispatch(tokens: int, experts: int = 64, top_k: int = 8, hidden: int = 256,
                 ffn: int = 128) -> dict:
  """Wall time of both dispatches (blocked compute) on 8 fake CPU devices, expert=8."""
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (tokens, hidden))
  idx, w = _routing(keys[1], tokens, experts, top_k)
  wg = jax.random.normal(keys[2], (experts, hidden, ffn)) * 0.05
  wu = jax.random.normal(keys[3], (experts, hidden, ffn)) * 0.05
  wd = jax.random.normal(keys[4], (experts, ffn, hidden)) * 0.05
  mesh = make_mesh({"expert": 8}, devices=jax.devices("cpu")[:8])
  args = (x, idx, w, wg, wu, wd)
  results = {"shape": {"tokens": tokens, "experts": experts, "top_k": top_k, "hidden": hidden,
                       "ffn": ffn, "mesh": "expert=8", "impl": "blocked", "exchange": "padded"}}
  with jax.set_mesh(mesh):
    args = jax.device_put(args, jax.sharding.NamedSharding(mesh, jax.P()))
    for dispatch in ("a2a", "allgather"):
      fwd = jax.jit(lambda *a, dispatch=dispatch: routed_experts(
          *a, impl="blocked", block_size=64, dispatch=dispatch, exchange="padded")[0])
      grad = jax.jit(jax.grad(lambda *a, f=fwd: jnp.sum(f(*a) ** 2), argnums=(0, 2, 3, 4, 5)))
      results[dispatch] = {"fwd_s": _timing.best_time(fwd, *args),
                           "fwd_grad_s": _timing.best_time(grad, *args)}
      print(f"cpu {dispatch:9s} {results[dispatch]}", flush=True)
  results["a2a_over_allgather_fwd"] = results["a2a"]["fwd_s"] / results["allgather"]["fwd_s"]
  results["a2a_over_allgather_fwd_grad"] = (results["a2a"]["fwd_grad_s"] /
                                            results["allgather"]["fwd_grad_s"])
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "moe_dispatch.json"))
  parser.add_argument("--skip_tpu", action="store_true")
  parser.add_argument("--cpu_tokens", type=int, default=4096)
  parser.add_argument("--layer_impls", default="gmm,ragged")  # gmm: TPU's auto (resolve_impl).
  args = parser.parse_args()
  report = {"benchmark": "moe_dispatch", "host": platform.node(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "expected_bytes": expected_bytes()}
  if not args.skip_tpu:
    devices = _tpu_devices()
    report["tpu_device_kind"] = devices[0].device_kind
    report["tpu_grouped_matmul"] = tpu_grouped_matmul(devices)
    report["tpu_layer"] = {impl: tpu_layer(devices, impl) for impl in args.layer_impls.split(",")}
  report["cpu_dispatch"] = cpu_dispatch(args.cpu_tokens)
  _results.write_json(args.out, report, indent=1)


if __name__ == "__main__":
  main()

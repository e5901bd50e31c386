"""Attention backends: TPU-compiler memory of forward+backward; CPU speed blockwise vs reference.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/attention.py [--lengths=8192,32768]
      [--out=benchmarks/results/attention.json]

Part 1 compiles out, vjp(q, k, v) of one attention call (1 row x 8 heads, 2 kv heads, head_dim
128, bf16, causal + segment ids) with the real TPU compiler for one chip of a v5p:2x2x1 topology
(libtpu on a CPU host, as launch/tpu_topology.py does) for reference, blockwise and splash, and
records temp bytes per chip and the HLO buffers with two dims >= T (a refused compile records the
compiler's message). Part 2 times jit fwd and fwd+grad on this CPU for reference and blockwise at
small sizes and writes the ratios (how "auto" was chosen for CPU). Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # Quiets libtpu's start-up warnings.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _results  # noqa: E402
from klong_jax.kernels import attention as kernels  # noqa: E402
from klong_jax.kernels.attention import blockwise, reference, splash  # noqa: E402
from klong_jax.kernels.attention.dispatch import DEFAULT_BLOCKS  # noqa: E402
from klong_jax.launch import tpu_topology  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 128


def _impls(tpu: bool) -> dict:
  return {
      "reference": reference.attention,
      "blockwise": lambda q, k, v, s: blockwise.attention(
          q, k, v, s, block_q=DEFAULT_BLOCKS["blockwise"], block_kv=DEFAULT_BLOCKS["blockwise"]),
      "splash": lambda q, k, v, s: splash.attention(
          q, k, v, s, block_q=DEFAULT_BLOCKS["splash"], block_kv=DEFAULT_BLOCKS["splash"],
          interpret=not tpu),
  }


def _fwd_bwd(fn):
  def step(q, k, v, seg, do):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *pullback(do))
  return step


def tpu_compile(impl: str, length: int, devices) -> dict:
  """Compile fwd+bwd of one attention call for one TPU chip; memory and big-buffer report."""
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  act = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
  kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
  seg = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=sharding)
  row = {"impl": impl, "seq_len": length}
  start = time.perf_counter()
  try:
    compiled = jax.jit(_fwd_bwd(_impls(True)[impl])).lower(act, kv, kv, seg, act).compile()
  except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result.
    msg = str(e).splitlines()[0][:400]
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    row.update(compiled=False, error=msg, compile_s=time.perf_counter() - start)
    if need:
      row["temp_bytes_required"] = float(need.group(1)) * 1024 ** "KMGT".index(need.group(2)) \
          * 1024
    print(f"{impl:10s} T={length:6d} refused: {msg[:120]}", flush=True)
    return row
  mem = compiled.memory_analysis()
  big = tpu_topology.square_buffers(compiled.as_text(), length)
  row.update(compiled=True, compile_s=time.perf_counter() - start,
             temp_bytes=int(mem.temp_size_in_bytes),
             argument_bytes=int(mem.argument_size_in_bytes),
             output_bytes=int(mem.output_size_in_bytes),
             buffers_with_two_dims_ge_T=big[:5], has_t_by_t_buffer=bool(big))
  print(f"{impl:10s} T={length:6d} temp {row['temp_bytes'] / 2**20:10.1f} MiB  T x T buffers: "
        f"{big[:2] or 'none'}  ({row['compile_s']:.0f} s)", flush=True)
  return row


def tpu_compile_auto(length: int, devices) -> dict:
  """impl="auto" through the dispatcher, 4 rows sharded over the 4 chips' "data" axis: must pick
  splash (a Mosaic custom call in the HLO) inside shard_map; temp bytes per chip."""
  mesh = jax.make_mesh((len(devices),), ("data",), devices=list(devices),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = len(devices)
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    act = jax.ShapeDtypeStruct((rows, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((rows, length, KV_HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)
    seg = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=spec)
    start = time.perf_counter()
    step = _fwd_bwd(lambda q, k, v, s: kernels.attend(q, k, v, segment_ids=s, impl="auto",
                                                      batch_axes="data"))
    compiled = jax.jit(step).lower(act, kv, kv, seg, act).compile()
  hlo = compiled.as_text()
  row = {"impl": "auto", "seq_len": length, "rows": rows, "mesh": {"data": rows},
         "compile_s": time.perf_counter() - start,
         "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
         "mosaic_custom_call": "tpu_custom_call" in hlo,
         "has_t_by_t_buffer": bool(tpu_topology.square_buffers(hlo, length))}
  print(f"auto (4 chips) T={length:6d} temp {row['temp_bytes'] / 2**20:10.1f} MiB per chip, "
        f"splash kernel in HLO: {row['mosaic_custom_call']}", flush=True)
  return row


def _best_interleaved(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
  """Best wall-clock seconds per function over `rounds`, calling them in turn each round (after
  one warm-up each), so load from other processes on a shared host hits all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def cpu_speed(batch: int, length: int, heads: int, kv_heads: int, head_dim: int) -> dict:
  """fwd and fwd+grad seconds of reference and blockwise on the host CPU, packed fp32 rows."""
  cpu = jax.devices("cpu")[0]
  ks = jax.random.split(jax.random.key(0), 3)
  with jax.default_device(cpu):
    q = jax.random.normal(ks[0], (batch, length, heads, head_dim))
    k = jax.random.normal(ks[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(ks[2], (batch, length, kv_heads, head_dim))
    seg = jnp.broadcast_to((jnp.arange(length) >= length // 3).astype(jnp.int32) + 1,
                           (batch, length))
    result = {"shape": dict(batch=batch, seq_len=length, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, dtype="float32")}
    impls = {name: _impls(False)[name] for name in ("reference", "blockwise")}
    fwd = _best_interleaved({n: jax.jit(fn) for n, fn in impls.items()}, (q, k, v, seg), 9)
    grad = _best_interleaved({n: jax.jit(jax.grad(
        lambda q, k, v, s, fn=fn: jnp.sum(fn(q, k, v, s) ** 2), argnums=(0, 1, 2)))
        for n, fn in impls.items()}, (q, k, v, seg), 5)
    for name in impls:
      result[name] = {"fwd_s": fwd[name], "fwd_grad_s": grad[name]}
  for key in ("fwd_s", "fwd_grad_s"):
    result[f"blockwise_over_reference_{key}"] = result["blockwise"][key] / result["reference"][key]
  print(f"CPU {batch}x{length}: blockwise/reference fwd "
        f"{result['blockwise_over_reference_fwd_s']:.2f}, fwd+grad "
        f"{result['blockwise_over_reference_fwd_grad_s']:.2f}", flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="8192,32768")
  parser.add_argument("--impls", default="reference,blockwise,splash")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "attention.json"))
  args = parser.parse_args()
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  rows = [tpu_compile(impl, int(t), topo.devices) for t in args.lengths.split(",")
          for impl in args.impls.split(",")]
  report = {
      "benchmark": "attention", "backend": jax.default_backend(), "host": platform.node(),
      "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "tpu_compile": {"topology": "v5p:2x2x1 (one chip)",
                      "device_kind": topo.devices[0].device_kind,
                      "shape": dict(batch=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                    dtype="bfloat16", segment_ids=True),
                      "what": "jit(out, vjp(q, k, v)) of one attention call",
                      "blocks": DEFAULT_BLOCKS, "results": rows,
                      "auto_on_4_chips": tpu_compile_auto(int(args.lengths.split(",")[0]),
                                                          topo.devices)},
      "cpu_speed": [cpu_speed(8, t, 4, 2, 16) for t in (64, 128, 256, 512)],
      "cpu_auto": f"reference for T <= {DEFAULT_BLOCKS['blockwise']} (one blockwise tile), "
                  "blockwise above (klong_jax/kernels/attention/dispatch.py)",
  }
  _results.write_json(args.out, report, indent=2)


if __name__ == "__main__":
  main()

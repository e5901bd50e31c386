"""Vocab loss memory on a real TPU compiler, and CPU speed: full fp32 logits vs vocab tiles.

  .venv/bin/python -m benchmarks.vocab_loss [--lengths=8192,32768] [--topology=v5p:2x2x1]
      [--out=benchmarks/results/vocab_loss.json]

Compiles value_and_grad (w.r.t. hidden and head) of the masked next-token CE for hidden
[1, T, 4096] bf16 and head [4096, 151552] bf16 (GLM-4.5-Air's) with the TPU compiler (libtpu; runs
on a CPU-only host, no TPU needed) on `--topology`, with the head sharded over `fsdp` (its embed
dim, the pod configs' layout) or over `tensor` (its vocab dim), for `kernels/vocab` reference
(full logits) and tiled, and records the compiler's per-chip temporaries. Then times both on CPU
at a small size. Writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import _results, _timing  # noqa: E402
from klong_jax.kernels import vocab  # noqa: E402
from klong_jax.parallel.mesh import MESH_AXES  # noqa: E402
from klong_jax.parallel.rules import LOGICAL_RULES  # noqa: E402

D, V = 4096, 151552
GIB = float(1 << 30)


def masked_ce(impl: vocab.VocabLoss):
  """(hidden, head, targets, weights) -> masked mean NLL, by `impl`."""
  def loss(hidden, head, targets, weights):
    logp = vocab.token_logprobs_from_hidden(hidden, head, targets, vocab_loss=impl)
    return -jnp.sum(logp * weights) / jnp.maximum(weights.sum(), 1.0)
  return loss


def tpu_devices(topology: str) -> list:
  """Compile-only TPU devices of `topology` ("v5p:2x2x1") from libtpu (JAX stays on CPU)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  dims = tuple(int(d) for d in topology.split(":")[1].split("x"))
  bounds = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1), strict=True))
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default", chips_per_host_bounds=bounds,
                                      num_slices=1)
  return list(desc.devices)


# Where the head lives on the 4 chips: over `fsdp` on its embed dim (the pod configs' layout,
# tensor=1), or over `tensor` on its vocab dim. Hidden [1, T, D] is replicated (one row).
MESHES = {"fsdp": ((1, -1, 1, 1), ("fsdp", None)), "tensor": ((1, 1, 1, -1), (None, "tensor"))}


def tpu_memory(topology: str, mesh_name: str, length: int, impl: vocab.VocabLoss) -> dict:
  """The TPU compiler's per-chip bytes for value_and_grad of the masked CE at `length`."""
  devices = tpu_devices(topology)
  shape, head_spec = MESHES[mesh_name]
  shape = tuple(len(devices) if n == -1 else n for n in shape)
  mesh = jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)

  def abstract(shape, dtype, *spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, jax.P(*spec)))
  args = (abstract((1, length, D), jnp.bfloat16), abstract((D, V), jnp.bfloat16, *head_spec),
          abstract((1, length), jnp.int32), abstract((1, length), jnp.float32))
  fn = jax.value_and_grad(masked_ce(impl), argnums=(0, 1))
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
      compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - the compiler's own out-of-HBM refusal is a result.
    return {"error": str(e).strip().splitlines()[0][:300],
            "compile_s": time.perf_counter() - start}
  mem = compiled.memory_analysis()
  out = {"compile_s": time.perf_counter() - start, "device_kind": devices[0].device_kind,
         "chips": len(devices), "temp_bytes": mem.temp_size_in_bytes,
         "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
         "temp_gib": mem.temp_size_in_bytes / GIB}
  print(f"  {mesh_name:6s} T={length:6d} {impl.impl:9s} temp {out['temp_gib']:8.3f} GiB/chip "
        f"(compiled in {out['compile_s']:.0f} s)", flush=True)
  return out



def cpu_speed(tokens: int, dim: int, vocab_size: int, tiles: vocab.VocabLoss) -> dict:
  """CPU seconds of the masked CE's value_and_grad, reference vs tiled, fp32."""
  cpu = jax.devices("cpu")[0]
  k = jax.random.split(jax.random.key(0), 3)
  args = jax.device_put((jax.random.normal(k[0], (1, tokens, dim)),
                         jax.random.normal(k[1], (dim, vocab_size)) * 0.05,
                         jax.random.randint(k[2], (1, tokens), 0, vocab_size),
                         jnp.ones((1, tokens), jnp.float32)), cpu)
  out = {"tokens": tokens, "dim": dim, "vocab": vocab_size, "chunk_tokens": tiles.chunk_tokens,
         "chunk_vocab": tiles.chunk_vocab}
  for impl in (vocab.VocabLoss("reference"), tiles):
    fn = jax.jit(jax.value_and_grad(masked_ce(impl), argnums=(0, 1)))
    out[f"{impl.impl}_s"] = _timing.best_time(fn, *args)
    print(f"  cpu {impl.impl:9s} fwd+grad {out[f'{impl.impl}_s'] * 1e3:8.1f} ms", flush=True)
  out["tiled_over_reference"] = out["tiled_s"] / out["reference_s"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="8192,32768")
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "vocab_loss.json"))
  a = parser.parse_args()
  tiles = vocab.VocabLoss()  # configs/common.py defaults
  result = {"host": platform.node(), "jax": jax.__version__, "topology": a.topology,
            "hidden": [1, "T", D], "head": [D, V], "dtype": "bfloat16",
            "sharding": {k: f"head P{v[1]}, hidden replicated" for k, v in MESHES.items()},
            "chunk_tokens": tiles.chunk_tokens, "chunk_vocab": tiles.chunk_vocab, "tpu": {}}
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    result["tpu"] = {"skipped": f"libtpu not installed ({e})"}
  else:
    print(f"TPU compiler, {a.topology}:", flush=True)
    for mesh_name in MESHES:
      for length in (int(x) for x in a.lengths.split(",")):
        row = {impl.impl: tpu_memory(a.topology, mesh_name, length, impl)
               for impl in (vocab.VocabLoss("reference"), tiles)}
        if "temp_bytes" in row["reference"] and "temp_bytes" in row["tiled"]:
          row["temp_ratio_reference_over_tiled"] = (row["reference"]["temp_bytes"]
                                                    / max(row["tiled"]["temp_bytes"], 1))
        result["tpu"][f"head_over_{mesh_name}/T={length}"] = row
  print("CPU speed:", flush=True)
  result["cpu"] = cpu_speed(2048, 256, 32768, vocab.VocabLoss("tiled", 512, 8192))
  rows = [{"metric": f"tpu temp GiB/chip {t} tiled", "value": r["tiled"]["temp_gib"],
           "unit": "GiB", "baseline": "reference", "baseline_value": r["reference"]["temp_gib"]}
          for t, r in result["tpu"].items()
          if isinstance(r, dict) and "temp_gib" in r.get("tiled", {})
          and "temp_gib" in r.get("reference", {})]
  rows.append({"metric": "cpu fwd+grad s (tiled)", "value": result["cpu"]["tiled_s"], "unit": "s",
               "baseline": "reference", "baseline_value": result["cpu"]["reference_s"]})
  result["summary"] = rows
  _results.write_json(a.out, result)


if __name__ == "__main__":
  main()

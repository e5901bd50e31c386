"""HF safetensors export/import speed and import host-memory peak, on a mid-size synthetic MoE.

  .venv/bin/python benchmarks/hf_io.py [--out=benchmarks/results/hf_io.json]

Exports a random model (fp32, ~200 MB) in 64 MB shards, then imports it in a fresh subprocess
(1 device, then 8 fake CPU devices on an fsdp x expert mesh) and records wall time and the growth
of peak RSS during the import. RSS includes the file pages that safetensors memory-maps, so it
is an upper bound on anonymous host memory. Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIELDS = dict(vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
              head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
              num_experts_per_tok=4)

_CHILD = """
import json, resource, sys, time
import jax
from klong_jax.model import hf
from klong_jax.parallel.mesh import make_mesh
hf.abstract_model(hf.load_hf_config(sys.argv[1]))  # Warm imports/tracing before measuring.
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mesh = make_mesh({"fsdp": 2, "expert": 4}) if jax.device_count() == 8 else None
start = time.perf_counter()
model = hf.import_hf(sys.argv[1], mesh=mesh)
jax.block_until_ready(jax.tree.leaves(hf.params_tree(model)))
took = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"import_s": took, "rss_growth_bytes": (peak - base) * 1024,
                  "devices": jax.device_count()}))
"""


def _import_in_child(path: str, devices: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  run = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True,
                       env=env, check=True)
  return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/hf_io.json"))
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from klong_jax.model import hf
  from klong_jax.model.config import get_preset

  cfg = get_preset("tiny").replace(**FIELDS)
  graphdef, state, _ = hf.abstract_model(cfg)
  rng = np.random.default_rng(0)
  state.replace_by_pure_dict(jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), state.to_pure_dict()))
  model = nnx.merge(graphdef, state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(hf.params_tree(model)))
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    out = hf.export_hf(model, cfg, os.path.join(tmp, "hf"), max_shard_bytes=64 << 20)
    export_s = time.perf_counter() - start
    shards = len(list(out.glob("*.safetensors")))
    runs = [_import_in_child(str(out), d) for d in (1, 8)]
  result = {
      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
      "param_bytes": nbytes, "shards": shards, "export_s": export_s,
      "export_MBps": nbytes / export_s / 1e6,
      "imports": [{**r, "import_MBps": nbytes / r["import_s"] / 1e6,
                   "rss_growth_over_params": r["rss_growth_bytes"] / nbytes} for r in runs]}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp_out = f"{args.out}.tmp-{os.getpid()}"
  with open(tmp_out, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp_out, args.out)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()

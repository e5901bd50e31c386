"""Policy publishing: trainer step time without / with sync / with async publishing, and bytes per
version bf16 vs fp32, in one run.

  python -m benchmarks.publish [--steps=8 --width=1024 --layers=8]

The "trainer" is a donating jitted AdamW step (optax, the project's optimizer library) over a
stack of fp32 matmul weights plus router / norm leaves; a version is published after every step
through `reload.save_policy` (sync, what rl/train.py did) or `reload.AsyncPublisher` (a device
snapshot, then a background upload; what rl/train.py does now), each cast by the dtype policy to
bf16. The step's wall time counts the publish call (what the training loop waits for). On this
2-core CPU box the background upload competes with the step for the same cores; on a TPU host the
step runs on the chips. Results -> benchmarks/results/publish.json.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from benchmarks._results import write_json
from klong_jax.inference import reload

_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps per mode and block.")
_WIDTH = flags.DEFINE_integer("width", 1024, "Matmul weight side.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Matmul weights (width x width fp32 each).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/publish.json", "Result JSON.")


def _params(width: int, layers: int) -> dict:
  key = jax.random.PRNGKey(0)
  return {f"layer{i}": {"attn": {"kernel": jax.random.normal(jax.random.fold_in(key, i),
                                                             (width, width)) * 0.02},
                        "norm": {"scale": jnp.ones((width,))},
                        "router": {"kernel": jnp.zeros((width, 8))}} for i in range(layers)}


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str]) -> None:
  del argv
  tx = optax.adamw(1e-3)

  def _step(params, opt):
    grads = jax.tree.map(lambda p: jnp.tanh(p @ p.T)[:, :p.shape[1]] * 1e-3
                         if p.ndim == 2 and p.shape[0] == p.shape[1] else jnp.zeros_like(p),
                         params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  step = jax.jit(_step, donate_argnums=(0, 1))
  params = _params(_WIDTH.value, _LAYERS.value)
  opt = tx.init(params)
  params, opt = jax.block_until_ready(step(params, opt))  # compile
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  result: dict = {"params_mib": nbytes / 2**20, "steps": _STEPS.value,
                  "device": jax.devices()[0].device_kind}
  times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
  version = 0
  with tempfile.TemporaryDirectory() as tmp:
    # Modes in blocks, the block sequence twice: load drift on a shared host hits every mode.
    for mode in ("none", "sync", "async", "none", "sync", "async"):
      root = os.path.join(tmp, mode)
      pub = reload.AsyncPublisher(root, jnp.bfloat16) if mode == "async" else None
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        params, opt = step(params, opt)
        if mode == "sync":
          reload.save_policy(root, version, params, dtype=jnp.bfloat16)
        elif pub is not None:
          pub.publish(version, params)
        jax.block_until_ready((params, opt))
        times[mode].append(time.perf_counter() - t0)
        version += 1
      if pub is not None:
        t0 = time.perf_counter()
        pub.close()
        result.setdefault("async_drain_s", []).append(time.perf_counter() - t0)
    for mode, ts in times.items():
      result[mode] = {"step_s_median": statistics.median(ts), "step_s_mean": statistics.mean(ts),
                      "step_s_min": min(ts), "steps": len(ts)}
      print(mode, result[mode], flush=True)
    reload.save_policy(os.path.join(tmp, "fp32"), 0, params)
    one = reload.list_versions(os.path.join(tmp, "async"))[0]
    bf16 = _dir_bytes(os.path.join(tmp, "async", str(one)))
    fp32 = _dir_bytes(os.path.join(tmp, "fp32", "0"))
  base = result["none"]["step_s_median"]
  result["ratio_sync_vs_none"] = result["sync"]["step_s_median"] / base
  result["ratio_async_vs_none"] = result["async"]["step_s_median"] / base
  result["bytes_bf16_version"], result["bytes_fp32_version"] = bf16, fp32
  result["ratio_bytes_bf16_vs_fp32"] = bf16 / fp32
  print({k: v for k, v in result.items() if k.startswith("ratio")})
  write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

"""Train-step throughput: tokens/s, model FLOP/s and MFU of the real SFT step; scan vs unrolled.

  python -m benchmarks.train_step [--presets=tiny,small] [--batch=8] [--seq_len=256] \
      [--devices=1] [--out=benchmarks/results/train_step.json]

The step is `train.step.make_sft_step` (AdamW, MoE aux losses), compiled once through the AOT
path of `tools.plan` (so the compile time is measured alone), then run on random tokens for at
least `--seconds`. FLOPs are `tools.flops.train_flops_per_token` (causal attention, top_k experts);
MFU is against `tools.devices` peaks and absent on CPU. The scan comparison builds the same model
with `scan_layers` on and off (`--scan_layers` layers deep), checks that one step gives the same
loss and parameters, and reports the compile-time ratio.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import _results
from klong_jax.launch import plan as plan_lib
from klong_jax.model import sharded
from klong_jax.model.config import get_preset
from klong_jax.parallel import mesh as mesh_lib
from klong_jax.parallel import rules as rules_lib
from klong_jax.perf import devices, flops
from klong_jax.train import step as step_lib

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "Model presets to time.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices in the fsdp mesh (0 = all).")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Minimum timed seconds per preset.")
_DTYPE = flags.DEFINE_string("compute_dtype", "", "float32 / bfloat16 ('' = bf16 off CPU).")
_SCAN_LAYERS = flags.DEFINE_integer("scan_layers", 8, "Depth of the scan vs unrolled model.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/train_step.json", "Result JSON.")


def _optim(dtype: str):
  cfg = plan_lib.default_optim()
  cfg.compute_dtype = dtype
  return cfg


def _mesh():
  n = _DEVICES.value or jax.device_count()
  return mesh_lib.make_mesh({"fsdp": n}, devices=jax.devices()[:n])


def _state_and_batch(model_cfg, one, mesh, batch: int, seq: int, seed: int = 0):
  model = sharded.create_sharded_model(model_cfg, mesh, seed=0)
  _, params, rest = step_lib.split_model(model)
  state = step_lib.init_state(params, rest, one.tx, one.state_shardings)
  rng = np.random.default_rng(seed)
  arrays = {"tokens": rng.integers(1, model_cfg.vocab_size, (batch, seq)),
            "positions": np.tile(np.arange(seq), (batch, 1)),
            "segment_ids": np.ones((batch, seq)), "loss_mask": np.ones((batch, seq))}
  inputs = {k: jax.device_put(jnp.asarray(v, jnp.int32), one.batch_sharding)
            for k, v in arrays.items()}
  return state, inputs


def time_preset(name: str, dtype: str) -> dict:
  """Compile time, steady-state tokens/s, model TFLOP/s and MFU of one preset's SFT step."""
  model_cfg = get_preset(name)
  mesh = _mesh()
  batch, seq = _BATCH.value, _SEQ.value
  one = plan_lib.compile_step(model_cfg, _optim(dtype), mesh, rules_lib.LOGICAL_RULES, batch,
                              seq)
  state, inputs = _state_and_batch(model_cfg, one, mesh, batch, seq)
  state, m = one.compiled(state, inputs)  # Warm-up.
  jax.block_until_ready(m)
  steps, t0 = 0, time.perf_counter()
  while steps < 3 or time.perf_counter() - t0 < _SECONDS.value:
    state, m = one.compiled(state, inputs)
    jax.block_until_ready(m)
    steps += 1
  seconds = (time.perf_counter() - t0) / steps
  tok_s = batch * seq / seconds
  n = mesh.devices.size
  kind = jax.devices()[0].device_kind
  mfu = flops.mfu(tok_s, model_cfg, kind, n, seq_len=seq)
  result = {"preset": name, "batch": batch, "seq_len": seq, "devices": n, "compute_dtype": dtype,
            "compile_s": one.seconds, "step_s": seconds, "tokens_per_s": tok_s,
            "train_flops_per_token": flops.train_flops_per_token(model_cfg, seq),
            "model_tflops": flops.achieved_flops(tok_s, model_cfg, seq_len=seq) / 1e12,
            "mfu": mfu, "loss": float(m["loss"])}
  print(f"{name}: {tok_s:,.0f} tokens/s, {result['model_tflops']:.4f} TFLOP/s"
        + (f", MFU {100 * mfu:.1f}%" if mfu is not None else " (no peak for this device)")
        + f", compile {one.seconds:.1f} s", flush=True)
  return result


def scan_vs_unrolled(dtype: str, repeats: int = 2) -> dict:
  """Same model scanned and unrolled: one-step loss/params agree; best-of-`repeats` compile s.

  Compiles alternate between the two variants so machine load and warm-up hit both alike.
  """
  base = get_preset("tiny").replace(num_layers=_SCAN_LAYERS.value)
  mesh = _mesh()
  out, params, compiled = {}, {}, {}
  for _ in range(repeats):
    for key, scan in (("scan", True), ("unrolled", False)):
      cfg = base.replace(scan_layers=scan)
      one = plan_lib.compile_step(cfg, _optim(dtype), mesh, rules_lib.LOGICAL_RULES, 4, 64)
      out[f"{key}_compile_s"] = min(out.get(f"{key}_compile_s", float("inf")), one.seconds)
      compiled[key] = (cfg, one)
  for key, (cfg, one) in compiled.items():
    state, inputs = _state_and_batch(cfg, one, mesh, 4, 64)
    state, m = one.compiled(state, inputs)
    out[f"{key}_loss"] = float(m["loss"])
    params[key] = jax.tree.leaves(state.params)
  out["max_abs_param_diff"] = max(float(jnp.max(jnp.abs(a - b)))
                                  for a, b in zip(params["scan"], params["unrolled"], strict=True))
  out["compile_ratio_unrolled_over_scan"] = out["unrolled_compile_s"] / out["scan_compile_s"]
  out["num_layers"] = base.num_layers
  print(f"scan vs unrolled ({base.num_layers} layers): compile {out['scan_compile_s']:.1f} s vs "
        f"{out['unrolled_compile_s']:.1f} s (best of {repeats}), loss diff "
        f"{abs(out['scan_loss'] - out['unrolled_loss']):.2e}", flush=True)
  return out


def summary_rows(presets: list[dict], scan: dict) -> list[dict]:
  """The `summary` rows `benchmarks.run_all` tabulates (value, unit, optional baseline)."""
  rows = []
  for r in presets:
    rows.append({"metric": f"{r['preset']} train tokens/s", "value": r["tokens_per_s"],
                 "unit": "tok/s"})
    rows.append({"metric": f"{r['preset']} model TFLOP/s", "value": r["model_tflops"],
                 "unit": "TFLOP/s"})
    if r["mfu"] is not None:
      rows.append({"metric": f"{r['preset']} MFU", "value": r["mfu"], "unit": "fraction"})
  rows.append({"metric": f"compile s, scan ({scan['num_layers']} layers)",
               "value": scan["scan_compile_s"], "unit": "s",
               "baseline": "unrolled", "baseline_value": scan["unrolled_compile_s"]})
  return rows


def main(argv: list[str]) -> None:
  del argv
  kind = jax.devices()[0].device_kind
  dtype = _DTYPE.value or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  presets = [time_preset(p, dtype) for p in _PRESETS.value]
  scan = scan_vs_unrolled(dtype)
  spec = devices.lookup(kind)
  result = {"benchmark": "train_step", "device": kind, "backend": jax.default_backend(),
            "peak_bf16_flops": spec.peak_bf16_flops if spec else None,
            "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "presets": presets,
            "scan_vs_unrolled": scan, "summary": summary_rows(presets, scan)}
  _results.write_json(_OUT.value, result, indent=2)


if __name__ == "__main__":
  app.run(main)

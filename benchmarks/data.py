"""Input-pipeline throughput: packed (non-padding) tokens/s of the Grain SFT pipeline.

Run: `python -m benchmarks.data [--num_trajs=256] [--workers=0,2]`; writes
benchmarks/results/data.json. (The train-step tokens/s comparison is added by the trainer bench.)
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
import time

from absl import app, flags

from klong_jax.data import pipeline, synthetic, tokenizer
from klong_jax.data.chat import ChatFormat
from klong_jax.data.splitting import SplitConfig

_NUM = flags.DEFINE_integer("num_trajs", 256, "synthetic trajectories to write")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker-process counts to measure")
_ROW = flags.DEFINE_integer("row_len", 1024, "packed row length (= split max_len)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "rows per batch")
_OUT = flags.DEFINE_string("out", "benchmarks/results/data.json", "result JSON")


def measure(paths: list[str], workers: int) -> dict[str, float]:
  cfg = pipeline.PipelineConfig(batch_size=_BATCH.value, row_len=_ROW.value,
                                split=SplitConfig(max_len=_ROW.value, overlap=128),
                                num_workers=workers, num_epochs=None)
  it = pipeline.make_sft_iterator(paths, cfg)
  next(it)  # start-up (worker spawn) excluded
  t0, toks, rows, batches = time.perf_counter(), 0, 0, 0
  while time.perf_counter() - t0 < 5.0:
    b = next(it)
    toks += int((b["segment_ids"] > 0).sum())
    rows += b["tokens"].shape[0]
    batches += 1
  dt = time.perf_counter() - t0
  if hasattr(it, "close"):
    it.close()
  return {"workers": workers, "packed_tokens_per_s": toks / dt, "batches": batches,
          "fill": toks / (rows * _ROW.value), "seconds": dt}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    fmt = ChatFormat(tokenizer.default_tokenizer(os.path.join(tmp, "tok")))
    paths = synthetic.write_synthetic_shards(os.path.join(tmp, "shards"), fmt, _NUM.value,
                                             num_shards=4, max_steps=16, sampled=True)
    results = [measure(paths, int(w)) for w in _WORKERS.value]
  out = {"benchmark": "data_pipeline", "row_len": _ROW.value, "batch_size": _BATCH.value,
         "num_trajs": _NUM.value, "cpu_count": os.cpu_count(), "machine": platform.machine(),
         "results": results}
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_path = path.with_suffix(".tmp")
  tmp_path.write_text(json.dumps(out, indent=2))
  tmp_path.replace(path)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)

"""Metrics writer: JSONL rows, TensorBoard event files, the progress line and ETA."""

import json
import logging
import os

import numpy as np

from klong_jax.train import metrics


def test_writes_jsonl_tensorboard_and_progress(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  w = metrics.MetricsWriter(str(tmp_path), total_steps=4, log_every=2)
  w.start(0)
  for step in range(1, 5):
    w.write(step, {"loss": np.float32(5.0 - step), "tokens": 100, "note": "skipped",
                   "vec": np.ones(3)})
  w.close()
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[2]["loss"] == 2.0 and rows[2]["tokens"] == 100.0
  assert "note" not in rows[0] and "vec" not in rows[0]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
  assert len(lines) == 2 and lines[0].startswith("step 2/4 | loss 3.0000")
  assert "ETA" in lines[0]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path / "x"), total_steps=2, enabled=False)
  assert w.write(1, {"loss": 1.0}) == {"loss": 1.0}
  w.close()
  assert not (tmp_path / "x").exists()


def test_format_eta():
  assert metrics.format_eta(3725) == "1:02:05"
  assert metrics.format_eta(float("nan")) == "?"

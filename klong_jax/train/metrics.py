"""One metrics sink for trainers: TensorBoard event files + JSONL + a periodic progress line.

`MetricsWriter.write(step, metrics)` records scalars every call; every `log_every` steps it logs
`step N/T | loss x | tokens/s y | ETA hh:mm:ss` through absl, with throughput measured over the
steps since the previous progress line (so compile time only skews the first line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


def _scalar(v: Any) -> float | None:
  """A Python float for numeric scalars (numpy/jax 0-d arrays included), else None."""
  try:
    arr = np.asarray(v)
  except Exception:  # noqa: BLE001 - any non-array value is simply skipped
    return None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def format_eta(seconds: float) -> str:
  """Seconds as H:MM:SS (or '?' when unknown)."""
  if not np.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsWriter:
  """Writes scalar metrics to `<workdir>/tb` (tensorboardX) and `<workdir>/metrics.jsonl`.

  `tokens_key` names the metric that counts tokens processed in a step (for tokens/s).
  `flops_per_token` (model FLOPs, `tools.flops.train_flops_per_token`) adds achieved TFLOP/s to
  the progress line, and `peak_flops` (all devices, `tools.devices`) adds MFU; None on CPU.
  Only process 0 should write; pass `enabled=False` elsewhere.
  """

  def __init__(self, workdir: str, *, total_steps: int, log_every: int = 10,
               tokens_key: str = "tokens", enabled: bool = True, tensorboard: bool = True,
               flops_per_token: float = 0.0, peak_flops: float | None = None):
    if log_every < 1:
      raise ValueError(f"log_every must be >= 1, got {log_every}")
    self.total_steps = total_steps
    self.log_every = log_every
    self.tokens_key = tokens_key
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.last_perf: dict[str, float] = {}
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._last_time: float | None = None
    self._last_step: int | None = None
    self._tokens_since = 0.0
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # lazy: heavy import, only on the writer
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def start(self, step: int) -> None:
    """Marks the clock at `step` (call before the loop and after a resume)."""
    self._last_time, self._last_step, self._tokens_since = time.perf_counter(), step, 0.0

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Records the scalar entries of `metrics` at `step`; returns them as floats."""
    scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    self._tokens_since += scalars.get(self.tokens_key, 0.0)
    if self._last_time is None:
      self.start(step - 1)
    if not self.enabled:
      return scalars
    record = {"step": int(step), "time": time.time(), **scalars}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if step % self.log_every == 0 or step == self.total_steps:
      self._progress(step, scalars)
    return scalars

  def _progress(self, step: int, scalars: Mapping[str, float]) -> None:
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    steps = max(step - self._last_step, 1)
    tok_s = self._tokens_since / dt
    eta = (self.total_steps - step) * dt / steps
    loss = scalars.get("loss", float("nan"))
    self.last_perf = {"tokens_per_s": tok_s}
    perf = ""
    if self.flops_per_token:
      self.last_perf["model_tflops"] = tok_s * self.flops_per_token / 1e12
      perf = f" | {self.last_perf['model_tflops']:.3g} TFLOP/s"
      if self.peak_flops:
        self.last_perf["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        perf += f" | MFU {100 * self.last_perf['mfu']:.1f}%"
    logging.info("step %d/%d | loss %.4f | tokens/s %.0f%s | %.3f s/step | ETA %s", step,
                 self.total_steps, loss, tok_s, perf, dt / steps, format_eta(eta))
    if self._tb is not None:
      for name, value in self.last_perf.items():
        self._tb.add_scalar(f"perf/{name}", value, step)
    self._last_time, self._last_step, self._tokens_since = now, step, 0.0

  def write_text(self, step: int, name: str, text: str) -> None:
    """Records a text note (config dump, stage change) in TensorBoard and the JSONL."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), name: text}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_text(name, text, step)

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

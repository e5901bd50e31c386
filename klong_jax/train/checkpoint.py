"""Orbax checkpoints of a training run: state pytree + Grain iterator state + free-form JSON.

One `Checkpointer` wraps `ocp.CheckpointManager` (async save, keep-N, optional best-by-metric).
Items per step: `state` (params, optimizer state, step: any pytree, `StandardSave`), `data`
(the Grain iterator via `grain.checkpoint.CheckpointSave`), `extra` (JSON: the RL stream cursor,
config notes). Orbax writes each step to a temp dir and renames it when complete, so a crash
mid-save never leaves a half checkpoint that `latest_step()` would pick up. Restore reshards to
the shardings of the target (`abstract_like` of the freshly built state). A `gs://` directory is
used natively: Orbax writes metadata through etils.epath (gcsfs) and arrays through tensorstore,
and on GCS (no atomic directory rename) it marks a finished step with `commit_success.txt`, so
`latest_step()` likewise skips a step whose save was cut short.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from klong_jax.data import storage


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the leaves' shardings) of a concrete pytree: a restore target."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves/restores `state` + data iterator + JSON extras under `directory/<step>/`.

  `best_metric` (with `best_mode` 'min' or 'max') keeps the `max_to_keep` best checkpoints by that
  metric instead of the newest; steps saved without it are kept only while no metric exists.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 100,
               async_save: bool = True, best_metric: str | None = None,
               best_mode: str = "min"):
    if best_mode not in ("min", "max"):
      raise ValueError(f"checkpoint best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = directory if storage.is_gcs(directory) else os.path.abspath(directory)
    self.save_every = save_every
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=best_metric is None,
        cleanup_tmp_directories=True,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def best_step(self) -> int | None:
    return self._mgr.best_step()

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: Any, *, data_iter: Any = None,
           extra: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts saving `step` (async); returns whether a save was started.

    Without `force`, saves only every `save_every` steps. `metrics` feed best-by-metric retention.
    """
    if not force and not self.should_save(step):
      return False
    items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    items["extra"] = ocp.args.JsonSave(dict(extra or {}))
    if self.best_metric and (metrics is None or self.best_metric not in metrics):
      raise ValueError(f"checkpoint.best_metric is {self.best_metric!r} but save() at step "
                       f"{step} got metrics {sorted(metrics or {})}; log that metric")
    metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
    saved = self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, target: Any, *, step: int | None = None, data_iter: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores (state, extra) at `step` (default latest) into `target`'s structure/shardings.

    `target` may be concrete arrays or `abstract_like` output; `data_iter` (if given) is
    restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; run without --resume first")
    items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_like(target)),
                             "extra": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return out["state"], dict(out["extra"] or {})

  def wait(self) -> None:
    """Blocks until in-flight async saves are committed."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

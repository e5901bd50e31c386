"""Grain input pipeline: ArrayRecord shards -> parse+validate -> split -> first-fit pack -> batch.

Deterministic by seed, optionally in worker processes (`num_workers`), with a checkpointable
iterator (`get_state`/`set_state`, or `grain.checkpoint.CheckpointSave/Restore` inside Orbax).
Batches are dicts of [batch, row_len] arrays (see packing.py) plus `num_rejected` [batch]: the
malformed records skipped just before each row's chunks (their sum over batches is the total).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from grain import experimental as grain_exp

from klong_jax.data import packing, schema, shards
from klong_jax.data.splitting import SplitConfig, split_trajectory


class NamedShardSource:
  """`grain.sources.ArrayRecordDataSource` whose read errors name the shard file."""

  def __init__(self, paths: Sequence[str]):
    if not paths:
      raise ValueError("no shard paths given; check the shard directory / glob")
    self._paths = [str(p) for p in paths]
    counts = [shards.num_records(p) for p in self._paths]  # opens each footer: names bad files
    self._offsets = np.cumsum([0] + counts).tolist()
    self._src = grain.sources.ArrayRecordDataSource(self._paths)

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, index: int) -> bytes:
    try:
      return self._src[index]
    except Exception as e:  # the C++ reader raises bare RuntimeErrors
      f = bisect.bisect_right(self._offsets, index) - 1
      raise shards.ShardError(f"shard {self._paths[f]} is corrupt: cannot read record "
                              f"{index - self._offsets[f]} ({e}); delete or re-write it") from None

  def __repr__(self) -> str:
    return f"NamedShardSource({len(self._paths)} shards, {len(self)} records)"


def default_advantage(traj: schema.Trajectory) -> float:
  """SFT data has advantage 0 unless the record's metadata carries one (RL groups)."""
  return float(traj.metadata.get("advantage", 0.0))


class ParseAndSplit(grain_exp.FlatMapTransform):
  """Record bytes -> validated Trajectory -> per-token feature dicts of its chunks.

  Malformed records are logged with id and reason and skipped (or raise when `strict`). The count
  of skipped records rides on the next emitted chunk as a `rejects` feature (at token 0).
  """

  def __init__(self, split: SplitConfig, vocab_size: int | None, strict: bool,
               drop_no_loss: bool, advantage_fn: Callable[[schema.Trajectory], float],
               max_fan_out: int = 4096, max_consecutive_rejects: int | None = None):
    self.split = split
    self.vocab_size = vocab_size
    self.strict = strict
    self.drop_no_loss = drop_no_loss
    self.advantage_fn = advantage_fn
    self.max_fan_out = max_fan_out
    # A repeating pipeline over shards whose every record is rejected would spin forever:
    # after this many rejects in a row (one pass over the data) it raises instead.
    self.max_consecutive_rejects = max_consecutive_rejects
    self._pending_rejects = 0
    self._rejects_in_a_row = 0

  def flat_map(self, element: bytes) -> list[dict[str, np.ndarray]]:
    try:
      traj = schema.from_bytes(element, self.vocab_size)
      if traj.status == "infra_error":
        raise schema.TrajectoryError(traj.id, "status infra_error is masked out of training")
      chunks = split_trajectory(traj, self.split, self.advantage_fn(traj))
    except ValueError as e:  # TrajectoryError and SplitError
      if self.strict:
        raise
      self._pending_rejects += 1
      logging.warning("rejected record: %s", e)
      self._check_spin(str(e))
      return []
    feats = [packing.chunk_features(c) for c in chunks
             if not self.drop_no_loss or c.loss_mask.any()]
    for f in feats:
      f["rejects"] = np.zeros_like(f["tokens"])
    if feats:
      feats[0]["rejects"][0] = self._pending_rejects
      self._pending_rejects = 0
      self._rejects_in_a_row = 0
    else:  # nothing to train on (no loss token): counts towards the spin guard too
      self._check_spin(f"record {traj.id} has no loss token")
    return feats

  def _check_spin(self, latest: str) -> None:
    self._rejects_in_a_row += 1
    if self.max_consecutive_rejects and self._rejects_in_a_row >= self.max_consecutive_rejects:
      raise ValueError(
          f"the last {self._rejects_in_a_row} records all yielded nothing to train on (latest: "
          f"{latest}); a repeating pipeline would never produce a batch. Check that the shards "
          "match the tokenizer/vocab and the split config (max_len vs the fixed prefix)")


def _stack_padded(rows: Sequence[dict[str, np.ndarray]], batch_size: int
                  ) -> dict[str, np.ndarray]:
  """Stacks rows into a batch, padding a short final batch with empty rows (static shapes)."""
  row_len = rows[0]["tokens"].shape[0]
  pad = packing.empty_rows(batch_size - len(rows), row_len)
  out = {k: np.concatenate([np.stack([r[k] for r in rows]), pad[k]]) for k in pad}
  out["num_rejected"] = np.asarray([r["num_rejected"] for r in rows]
                                   + [0] * (batch_size - len(rows)), np.int32)
  return out


def _to_row(packed: dict[str, Any]) -> dict[str, np.ndarray]:
  row = packing.rows_from_grain(packed)
  row["num_rejected"] = np.asarray(np.asarray(packed["rejects"]).sum(), np.int32)
  return row


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Knobs of the SFT/RL input pipeline (see `make_sft_dataset`)."""

  batch_size: int
  row_len: int
  split: SplitConfig
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1  # None: repeat forever
  num_workers: int = 0  # >0: grain worker processes
  read_threads: int = 2
  strict: bool = False
  vocab_size: int | None = None
  drop_no_loss: bool = True
  process_index: int = 0  # multi-host: this host reads records process_index::process_count
  process_count: int = 1


def make_sft_dataset(paths: Sequence[str], cfg: PipelineConfig,
                     advantage_fn: Callable[[schema.Trajectory], float] = default_advantage
                     ) -> grain.IterDataset:
  """The Grain dataset of packed batches over the given ArrayRecord shard files."""
  if cfg.split.max_len > cfg.row_len:
    raise ValueError(f"split max_len {cfg.split.max_len} exceeds row_len {cfg.row_len}; chunks "
                     "must fit a packed row")
  ds = grain.MapDataset.source(NamedShardSource(paths))
  if cfg.process_count > 1:
    ds = ds[cfg.process_index::cfg.process_count]
  guard = len(ds) if cfg.num_epochs != 1 else None  # repeating: fail after a pass of nothing
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  if cfg.num_epochs != 1:
    ds = ds.repeat(cfg.num_epochs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=16))
  it = grain_exp.FlatMapIterDataset(
      it, ParseAndSplit(cfg.split, cfg.vocab_size, cfg.strict, cfg.drop_no_loss, advantage_fn,
                        max_consecutive_rejects=guard))
  lengths = {k: cfg.row_len for k in (*packing.CHUNK_FEATURES, "rejects")}
  it = grain_exp.FirstFitPackIterDataset(it, length_struct=lengths,
                                         num_packing_bins=cfg.batch_size, shuffle_bins=False)
  it = it.map(_to_row).batch(cfg.batch_size, drop_remainder=False,
                             batch_fn=functools.partial(_stack_padded, batch_size=cfg.batch_size))
  if cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl apps: defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return it


def make_sft_iterator(paths: Sequence[str] | str, cfg: PipelineConfig,
                      advantage_fn: Callable[[schema.Trajectory], float] = default_advantage
                      ) -> grain.DatasetIterator:
  """A checkpointable iterator of packed batches; `paths` may be a shard directory."""
  if isinstance(paths, str):
    paths = shards.list_shards(paths)
  return iter(make_sft_dataset(paths, cfg, advantage_fn))

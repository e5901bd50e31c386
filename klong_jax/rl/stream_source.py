"""The RL trainer's data source: a Grain IterDataset that follows the rollout stream directory.

Each element is one train-step batch. The iterator takes the next `groups_per_step` published group
shards (`<stream>/<stage>/*.array_record`, oldest first), computes group advantages
(rl/advantage.py), drops trajectories whose policy lag exceeds `max_staleness` versions, splits
them with the SFT splitter (every chunk keeps its rollout's advantage), packs the chunks into rows
(data/packing.py) and yields them `batch_size` rows at a time. We pack whole groups ourselves
instead of using Grain's FirstFitPack: that packer needs one chunk of lookahead, which would block a
synchronous generate -> train loop, and it would split a group across versions.

The iterator state (JSON, saved by `grain.checkpoint.CheckpointSave` inside the Orbax checkpoint)
holds the consumed shards, the current element (its shards, the records kept) and the next batch
in it, so a restarted trainer neither repeats nor skips a trajectory. It waits (polling, with a
log line and a timeout) only when too few fresh shards exist. A `gs://` stream is listed through
the GCS API (publish order = object creation time) and each shard is read from a local copy
(`cache_dir`; published shards are immutable), evicted once its element is built.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import grain
import numpy as np
from absl import logging

from klong_jax.data import packing, schema, shards, storage
from klong_jax.data.splitting import SplitConfig, SplitError, split_trajectory
from klong_jax.rl import advantage as adv_lib
from klong_jax.rl import minibatch

PrevStageRule = Literal["drain", "drop"]
# time_limited: trajectories trained on that a stage time limit ended (status agent_timeout).
# dropped_zero_var: groups with no signal (every kept member's advantage 0) left out of the batch
# by dynamic sampling (their trajectories in dropped_zero_var_trajectories); zero_var_kept: such
# groups taken anyway after `dynamic_sampling_max_reads`; cut_turns_masked / cut_tokens_masked:
# turns stopped at the token limit (and their loss tokens) masked out of the loss.
COUNTERS = ("groups", "trajectories_used", "time_limited", "dropped_stale", "dropped_stage",
            "dropped_infra", "dropped_invalid", "zero_groups", "chunks", "wait_s",
            "dropped_zero_var", "dropped_zero_var_trajectories", "zero_var_kept",
            "cut_turns_masked", "cut_tokens_masked")
LengthCutRule = Literal["train", "mask"]


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """How the trainer reads the stream (see the module docstring)."""

  stream: str
  batch_size: int
  row_len: int
  split: SplitConfig
  groups_per_step: int = 1         # Group shards per element (one element = >= 1 train batches).
  max_staleness: int = 1           # Drop a trajectory if current_version - its version > this.
  normalize_std: bool = False      # Divide advantages by the group std (the paper does not).
  vocab_size: int | None = None
  prev_stage: PrevStageRule = "drain"  # Older stages' unread shards: train on them, or drop.
  # The trainer's rl.temperature: a trajectory whose metadata says it was sampled at another
  # temperature has logprobs the PPO ratio cannot use; it is dropped (counted as invalid).
  temperature: float | None = None
  poll_s: float = 0.5
  wait_timeout_s: float = 600.0    # Raise if no fresh data arrives for this long.
  log_wait_every_s: float = 15.0
  cache_dir: str | None = None     # gs:// streams: local shard copies (default: a temp dir).
  # Routing replay: (MoE layers, top-k); batches then carry `routing` [rows, row_len, L, k].
  routing_shape: tuple[int, int] | None = None
  # Dynamic sampling (DAPO): a group whose kept members all have advantage 0 (no policy-gradient
  # signal) is left out of the batch and the loss denominator, and more groups are read instead.
  dynamic_sampling: bool = False
  # With dynamic sampling: after reading this many shards for one element (0 = no bound), fill
  # it with the zero-variance groups read, so a policy whose groups all score alike still trains.
  dynamic_sampling_max_reads: int = 0
  # Prefer, among the oldest `family_lookahead` fresh shards, one whose task family (trajectory
  # metadata `family`, else its task id) the stage's current family cycle has not trained on
  # yet, else one the element does not hold yet (0 = publish order only). A cycle ends (and the
  # next begins) when no shard in the window has a family new to it.
  family_lookahead: int = 0
  # Turns cut at the token limit (Trajectory.cut_turns): "mask" = no loss on their tokens,
  # "train" = trained like any turn.
  length_cut: LengthCutRule = "train"
  # > 0: deal the element's trajectories into this many minibatches (rl/minibatch.py), each
  # packed into its own rows (padded to a multiple of `micro_rows`, 0 = batch_size) and marked in
  # the rows' `minibatch`; the trainer makes one optimizer update per minibatch. 0: one packing.
  updates_per_step: int = 0
  micro_rows: int = 0
  seed: int = 0                    # Seeds the dealing into minibatches (with the element's shards).

  def __post_init__(self):
    if self.split.max_len > self.row_len:
      raise ValueError(f"split max_len {self.split.max_len} exceeds row_len {self.row_len}")
    if self.groups_per_step < 1 or self.batch_size < 1:
      raise ValueError(f"groups_per_step and batch_size must be >= 1: {self}")
    if self.max_staleness < 0:
      raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
    if self.prev_stage not in ("drain", "drop"):
      raise ValueError(f"prev_stage must be 'drain' or 'drop', got {self.prev_stage!r}")
    if self.length_cut not in ("train", "mask"):
      raise ValueError(f"rl.length_cut must be 'train' or 'mask', got {self.length_cut!r}")
    micro = self.micro_rows or self.batch_size
    if self.updates_per_step < 0 or micro < 1 or self.batch_size % micro:
      raise ValueError(f"rl.updates_per_step ({self.updates_per_step}) must be >= 0 and the "
                       f"micro-batch rows ({micro}) must divide data.batch_size "
                       f"({self.batch_size})")
    if self.dynamic_sampling_max_reads < 0 or self.family_lookahead < 0:
      raise ValueError("rl.dynamic_sampling_max_reads and rl.family_lookahead must be >= 0 "
                       f"(0 = off), got {self.dynamic_sampling_max_reads}, "
                       f"{self.family_lookahead}")


def trajectory_version(traj: schema.Trajectory) -> int:
  """The oldest policy version that sampled any of the trajectory's tokens (-1: none sampled)."""
  pv = traj.policy_version[traj.policy_version >= 0]
  return int(pv.min()) if pv.size else -1


def mask_cut_turns(traj: schema.Trajectory) -> tuple[schema.Trajectory, int]:
  """The trajectory with no loss on its turns cut at the token limit, and the tokens masked."""
  if not traj.cut_turns:
    return traj, 0
  mask = traj.loss_mask.copy()
  for start, end in traj.cut_turns:
    mask[start:end] = 0
  return dataclasses.replace(traj, loss_mask=mask), int(traj.loss_mask.sum() - mask.sum())


def trajectory_family(traj: schema.Trajectory) -> str:
  """The task family of a trajectory: metadata `family` (rollout workers set it), else task id."""
  return str(traj.metadata.get("family") or traj.task_id)


def _stage_of(rel: str) -> int:
  head = rel.split(os.sep, 1)[0]
  return int(head) if head.isdigit() else -1


class StreamIterator(grain.DatasetIterator):
  """Checkpointable iterator of packed RL batches over a growing stream directory."""

  def __init__(self, cfg: StreamConfig):
    super().__init__()
    self.cfg = cfg
    self.remote = storage.is_gcs(cfg.stream)
    self.root = cfg.stream.rstrip("/") if self.remote else os.path.abspath(cfg.stream)
    self._cache: str | None = None
    if self.remote:
      self._cache = cfg.cache_dir or tempfile.mkdtemp(prefix="klong-stream-cache-")
      if cfg.cache_dir is None:
        weakref.finalize(self, shutil.rmtree, self._cache, True)
    self._created_ns: dict[str, int] = {}
    self.stage = 0
    self.version = 0
    self._consumed: set[str] = set()
    self._element: dict[str, Any] | None = None  # {"shards": [{"path", "keep"}], "next": k}
    self._batches: list[dict[str, np.ndarray]] | None = None
    self.counters = {k: 0.0 for k in COUNTERS}
    self.last_info: dict[str, Any] = {}
    self._cleared_stage: int | None = None
    self._families: dict[str, str] = {}  # shard -> task family (family_lookahead)
    # Families trained on in this stage's current cycle (family_lookahead): a stage's steps take
    # every family once before any twice, older stages' leftovers (drained first) included.
    self._cycle: set[str] = set()
    self.on_element: Callable[[StreamIterator], None] | None = None

  # -- control from the trainer -----------------------------------------------------------------

  def set_policy_version(self, version: int) -> None:
    """The version the trainer's params now have (staleness is measured against it)."""
    self.version = int(version)

  def set_stage(self, stage: int) -> None:
    """Switches to `stage`; with prev_stage='drop' older stages' unread shards are dropped."""
    if int(stage) != self.stage:
      self._cycle = set()
    self.stage = int(stage)

  # -- listing ----------------------------------------------------------------------------------

  def _listing(self) -> dict[int, list[str]]:
    """Published shards (relative paths) per stage directory `<stage>/*.array_record`."""
    out: dict[int, list[str]] = {}
    if self.remote:
      for st in storage.list_dirs(self.root):
        if not st.isdigit():
          continue
        for o in storage.list_objects(f"{self.root}/{st}/"):
          rel = o.path[len(self.root) + 1:]
          if rel.count("/") == 1 and shards.is_published_name(rel):
            out.setdefault(int(st), []).append(rel)
            self._created_ns[rel] = o.created_ns
      return out
    if not os.path.isdir(self.root):
      return out
    for name in os.listdir(self.root):
      if name.isdigit():
        d = os.path.join(self.root, name)
        out[int(name)] = [os.path.relpath(p, self.root)
                          for p in shards.list_shards(d, "*" + shards.SUFFIX)]
    return out

  def _published_ns(self, rel: str) -> int:
    """When a shard was published (mtime; gs://: object creation), for the read order."""
    if self.remote:
      return self._created_ns.get(rel, 0)
    try:
      return os.stat(os.path.join(self.root, rel)).st_mtime_ns
    except FileNotFoundError:
      return 0

  def _fresh(self) -> list[str]:
    """Unconsumed published shards to read, oldest first (relative paths)."""
    out = []
    for st, rels in self._listing().items():
      if st > self.stage:
        continue
      if st < self.stage and self.cfg.prev_stage == "drop":
        self._drop_old(st, rels)
        continue
      out.extend(rel for rel in rels if rel not in self._consumed)
    # Older stages first (drain), then publish order.
    return sorted(out, key=lambda rel: (_stage_of(rel), self._published_ns(rel), rel))

  def _drop_old(self, st: int, rels: list[str]) -> None:
    """Marks every unread shard of an older stage consumed, counting its trajectories dropped."""
    for rel in rels:
      if rel not in self._consumed:
        self._consumed.add(rel)
        n = shards.num_records(self._local(rel))
        self.counters["dropped_stage"] += n
        logging.info("stream: dropped %s (%d trajectories) from stage %d < current stage %d",
                     rel, n, st, self.stage)

  def _local(self, rel: str) -> str:
    """A local path to read the shard from (gs://: a cached copy, downloaded once)."""
    if self._cache is None:
      return os.path.join(self.root, rel)
    local = os.path.join(self._cache, rel)
    if not os.path.exists(local):
      storage.download(storage.join(self.root, rel), local)
    return local

  def _evict(self, keep: list[str]) -> None:
    """Drops cached shard copies except `keep` (the current element's, re-read on restore)."""
    if self._cache is None:
      return
    keep_paths = {os.path.join(self._cache, rel) for rel in keep}
    for dirpath, _, names in os.walk(self._cache):
      for name in names:
        path = os.path.join(dirpath, name)
        if path not in keep_paths:
          os.unlink(path)

  # -- reading one group ------------------------------------------------------------------------

  def _read_group(self, rel: str) -> tuple[list[schema.Trajectory | None], np.ndarray]:
    """The group's trajectories (None where malformed) and their advantages."""
    trajs: list[schema.Trajectory | None] = []
    for raw in shards.read_shard(self._local(rel)):
      try:
        trajs.append(schema.from_bytes(raw, self.cfg.vocab_size))
      except schema.TrajectoryError as e:
        logging.warning("stream: %s: rejected record: %s", rel, e)
        trajs.append(None)
    ok = [t for t in trajs if t is not None]
    adv = np.zeros((len(trajs),), np.float32)
    if ok:
      a, _, _ = adv_lib.group_advantages([t.reward for t in ok], [t.group_id for t in ok],
                                         normalize_std=self.cfg.normalize_std)
      adv[[i for i, t in enumerate(trajs) if t is not None]] = a
    return trajs, adv

  def _select(self, rel: str) -> tuple[list[int], bool]:
    """Reads a fresh shard, counts it, and returns the indices of the trajectories to train on
    and whether any of them has a nonzero advantage (the group carries signal)."""
    trajs, adv = self._read_group(rel)
    ok = [t for t in trajs if t is not None]
    self.counters["dropped_invalid"] += len(trajs) - len(ok)
    _, _, stats = adv_lib.group_advantages([t.reward for t in ok], [t.group_id for t in ok])
    self.counters["zero_groups"] += stats.num_zero_groups
    keep = []
    for i, t in enumerate(trajs):
      if t is None:
        continue
      if t.status == "infra_error" or t.reward is None:
        self.counters["dropped_infra"] += 1
        continue
      temp = t.metadata.get("temperature")
      if self.cfg.temperature is not None and temp is not None and \
          abs(float(temp) - self.cfg.temperature) > 1e-6:
        logging.warning("stream: %s: %s sampled at temperature %s but rl.temperature is %s; "
                        "dropped (set the workers' --temperature to rl.temperature)", rel, t.id,
                        temp, self.cfg.temperature)
        self.counters["dropped_invalid"] += 1
        continue
      v = trajectory_version(t)
      if v >= 0 and self.version - v > self.cfg.max_staleness:
        self.counters["dropped_stale"] += 1
        continue
      try:
        split_trajectory(t, self.cfg.split)
      except SplitError as e:
        logging.warning("stream: %s: cannot split: %s", rel, e)
        self.counters["dropped_invalid"] += 1
        continue
      keep.append(i)
    return keep, bool(np.any(adv[keep] != 0)) if keep else False

  def _shard_family(self, rel: str) -> str:
    """The task family of a shard's group (its first readable trajectory), cached."""
    if rel not in self._families:
      fam = rel
      for raw in shards.read_shard(self._local(rel)):
        try:
          fam = trajectory_family(schema.from_bytes(raw, self.cfg.vocab_size))
          break
        except schema.TrajectoryError:
          continue
      self._families[rel] = fam
    return self._families[rel]

  def _pick(self, fresh: list[str], avoid: set[str]) -> str:
    """The oldest fresh shard, or with `family_lookahead` the oldest of the first few whose
    family is new to the stage's family cycle, else not in `avoid` (the element's families so
    far): a stage trains on every family before repeating one, and a step's groups mix."""
    if not self.cfg.family_lookahead:
      return fresh[0]
    stage = _stage_of(fresh[0])  # older stages are still drained first
    window = [rel for rel in fresh[:self.cfg.family_lookahead] if _stage_of(rel) == stage]
    fams = [self._shard_family(rel) for rel in window]
    if stage == self.stage:
      for rel, fam in zip(window, fams, strict=True):
        if fam not in self._cycle and fam not in avoid:
          return rel
      if all(fam in self._cycle for fam in fams):
        self._cycle = set()  # nothing new to the cycle in sight: the next cycle starts
    for rel, fam in zip(window, fams, strict=True):
      if fam not in avoid:
        return rel
    return fresh[0]

  def _wait_for_shard(self, avoid: set[str] | None = None) -> str:
    """A fresh shard (`_pick`); polls while none exists, raising after `wait_timeout_s`."""
    t0 = time.monotonic()
    last_log = t0
    while True:
      fresh = self._fresh()
      if fresh:
        self.counters["wait_s"] += time.monotonic() - t0
        return self._pick(fresh, avoid or set())
      now = time.monotonic()
      if now - t0 > self.cfg.wait_timeout_s:
        raise TimeoutError(
            f"no fresh trajectory shards in {self.root}/{self.stage} for "
            f"{self.cfg.wait_timeout_s:.0f} s (policy version {self.version}); are rollout "
            "workers running against a server that serves this run's policy?")
      if now - last_log >= self.cfg.log_wait_every_s:
        logging.info("stream: waiting for fresh data in %s/%d (%.0f s so far)", self.root,
                     self.stage, now - t0)
        last_log = now
      time.sleep(self.cfg.poll_s)

  # -- elements ---------------------------------------------------------------------------------

  def _new_element(self) -> dict[str, Any]:
    """Consumes shards until `groups_per_step` groups with trainable trajectories are taken;
    with dynamic sampling, groups without signal are dropped and more groups read."""
    taken: list[dict[str, Any]] = []
    no_signal: list[dict[str, Any]] = []  # zero-variance groups read for this element
    families: set[str] = set()
    reads = dropped = 0
    cap = self.cfg.dynamic_sampling_max_reads
    while len(taken) < self.cfg.groups_per_step:
      if no_signal and cap and reads >= cap:
        taken.append(no_signal.pop(0))  # bounded search: fill with the no-signal groups read
        self.counters["zero_var_kept"] += 1
        continue
      rel = self._wait_for_shard(families)
      keep, signal = self._select(rel)
      self._consumed.add(rel)
      reads += 1
      if not keep:
        continue
      if self.cfg.dynamic_sampling and not signal:
        no_signal.append({"path": rel, "keep": keep})
        continue
      taken.append({"path": rel, "keep": keep})
      if self.cfg.family_lookahead:
        fam = self._shard_family(rel)
        families.add(fam)
        self._cycle.add(fam)
    for s in no_signal:  # read, not taken: out of the batch and the loss denominator
      dropped += 1
      self.counters["dropped_zero_var_trajectories"] += len(s["keep"])
    self.counters["dropped_zero_var"] += dropped
    self.counters["groups"] += len(taken)
    self.counters["trajectories_used"] += sum(len(s["keep"]) for s in taken)
    return {"shards": taken, "next": 0, "dropped_zero_var": dropped}

  def _build_batches(self, element: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]],
                                                             dict[str, Any]]:
    """Deterministically splits + packs an element's kept trajectories into batches."""
    chunks, ids, rewards, versions, time_limited = [], [], [], [], 0
    per_traj: list[list[schema.Chunk]] = []
    cut_turns = cut_tokens = 0
    for s in element["shards"]:
      trajs, adv = self._read_group(s["path"])
      for i in s["keep"]:
        t = trajs[i]
        if t is None:
          raise ValueError(f"stream shard {s['path']} record {i} no longer parses; shards must "
                           "be immutable once published")
        if self.cfg.length_cut == "mask" and t.cut_turns:
          t, masked = mask_cut_turns(t)
          cut_turns, cut_tokens = cut_turns + len(t.cut_turns), cut_tokens + masked
        per_traj.append([c for c in split_trajectory(t, self.cfg.split, float(adv[i]))
                         if c.loss_mask.any()])
        chunks.extend(per_traj[-1])
        ids.append(t.id)
        time_limited += t.status == "agent_timeout"
        rewards.append(float(t.reward))
        versions.append(trajectory_version(t))
    if self.cfg.updates_per_step:
      key = "|".join(sh["path"] for sh in element["shards"])
      rows = minibatch.pack_minibatches(
          per_traj, self.cfg.updates_per_step, self.cfg.micro_rows or self.cfg.batch_size,
          self.cfg.row_len, minibatch.element_rng(self.cfg.seed, key), self.cfg.routing_shape)
    else:
      rows = packing.pack_chunks(chunks, self.cfg.row_len,
                                 routing_shape=self.cfg.routing_shape)
    n = rows["tokens"].shape[0]
    b = self.cfg.batch_size
    nb = max(1, -(-n // b))
    pad = packing.empty_rows(nb * b - n, self.cfg.row_len, self.cfg.routing_shape)
    if "minibatch" in rows:
      pad["minibatch"] = np.full((nb * b - n,), -1, np.int32)  # in no minibatch
    full = {k: np.concatenate([rows[k], pad[k]]) for k in rows}
    batches = [{k: v[j * b:(j + 1) * b] for k, v in full.items()} for j in range(nb)]
    info = {"ids": ids, "rewards": rewards, "versions": versions, "chunks": len(chunks),
            "num_batches": nb, "time_limited": time_limited,
            "dropped_zero_var": int(element.get("dropped_zero_var", 0)),
            "cut_turns_masked": cut_turns, "cut_tokens_masked": cut_tokens}
    return batches, info

  def __next__(self) -> dict[str, np.ndarray]:
    if self._element is not None and self._batches is None:  # restored from a checkpoint
      self._batches, self._info = self._build_batches(self._element)
    if self._element is None or self._element["next"] >= len(self._batches):
      self._element = self._new_element()
      self._batches, self._info = self._build_batches(self._element)
      self._evict([sh["path"] for sh in self._element["shards"]])
      self.counters["chunks"] += self._info["chunks"]
      self.counters["time_limited"] += self._info["time_limited"]
      self.counters["cut_turns_masked"] += self._info["cut_turns_masked"]
      self.counters["cut_tokens_masked"] += self._info["cut_tokens_masked"]
      if self.on_element is not None:
        self.on_element(self)
    k = self._element["next"]
    self._element["next"] = k + 1
    info = self._info
    self.last_info = {
        "ids": info["ids"] if k == 0 else [], "rewards": info["rewards"] if k == 0 else [],
        "element_first": k == 0, "element_last": k + 1 == info["num_batches"],
        # This element's groups dropped for zero variance (dynamic sampling), first batch only.
        "dropped_zero_var": info["dropped_zero_var"] if k == 0 else 0,
        "min_version": min(info["versions"]) if info["versions"] else -1, "stage": self.stage}
    return self._batches[k]

  # -- checkpointing ----------------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    return {"stage": self.stage, "version": self.version, "consumed": sorted(self._consumed),
            "element": self._element, "counters": dict(self.counters),
            "family_cycle": sorted(self._cycle)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.stage = int(state["stage"])
    self.version = int(state["version"])
    self._consumed = set(state["consumed"])
    self._element = state["element"]
    self._cycle = set(state.get("family_cycle", ()))  # absent in older checkpoints
    self._batches = None
    self.counters = {k: float(state["counters"].get(k, 0.0)) for k in COUNTERS}

  def stats(self) -> dict[str, float]:
    """Cumulative counters, for metrics (prefixed `stream/`)."""
    return {f"stream/{k}": float(v) for k, v in self.counters.items()}


class StreamDataset(grain.IterDataset):
  """`iter(StreamDataset(cfg))` -> a `StreamIterator` (Grain IterDataset, checkpointable)."""

  def __init__(self, cfg: StreamConfig):
    super().__init__()
    self.cfg = cfg

  def __iter__(self) -> StreamIterator:
    return StreamIterator(self.cfg)

  def __str__(self) -> str:
    return f"StreamDataset({self.cfg.stream})"

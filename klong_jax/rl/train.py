"""Progressive RL trainer: `python -m klong_jax.rl.train --config=configs/rl_tiny.py --workdir=RUN
--stream=DIR [--init_checkpoint=SFT_CKPT] [--mode=async|sync]`.

`run(...)` reads top to bottom: mesh, model, init params (SFT checkpoint or policy dir), optimizer,
stream source, resume, publish version 0, loop. Each step trains one element (`groups_per_step`
groups; waits only when fresh data is short) in `rl.ppo_epochs` x minibatches jitted PPO+KL updates
(rl/step.py `update_plan`), then metrics, policy publishing every K steps (sync: every step),
curriculum promotion (reference <- params, new control.json), checkpoint (params, optimizer,
reference, stream cursor, version, curriculum). A killed trainer restarted on
the same workdir resumes from its newest checkpoint with no trajectory trained twice or skipped.
Sync mode is the baseline: the trainer gates the fleet with control.json `policy_min_version` and
trains only on trajectories of its current version (generate -> train -> generate).
`--workdir` and `--stream` may be `gs://` paths (a pod run, no gcsfuse): checkpoints and policy
versions go to GCS natively, and the local logs (metrics.jsonl, tb/, consumed.jsonl) go to
`--logdir` (default under $TMPDIR), mirrored to `<workdir>/logs/` at every checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from klong_jax.data import storage
from klong_jax.data.splitting import SplitConfig
from klong_jax.inference import reload
from klong_jax.parallel import mesh as mesh_lib
from klong_jax.parallel import rules as rules_lib
from klong_jax.perf import devices, flops
from klong_jax.rl import curriculum as curriculum_lib
from klong_jax.rl import minibatch
from klong_jax.rl import step as rl_step
from klong_jax.rl.stream_source import StreamConfig, StreamDataset, StreamIterator
from klong_jax.rollout.stream import write_json_atomic
from klong_jax.train import checkpoint, metrics, optim
from klong_jax.train import step as step_lib

_CONFIG: Any = None
_WORKDIR: Any = None
_STREAM: Any = None
_INIT: Any = None
_MODE: Any = None
_LOGDIR: Any = None


def load_init_params(path: str, params: Any, rest: Any) -> tuple[Any, Any]:
  """(params, rest) from an SFT checkpoint (run dir or its checkpoints/), or a policy dir.

  `rest` holds the router's selection bias (updated outside the gradient during SFT): it is part
  of the policy, so it is restored too (a params-only policy dir keeps `rest` as given). Restored
  onto the targets' shapes and shardings; the SFT optimizer state is not read.
  """
  from flax import nnx  # noqa: PLC0415

  path = epath.Path(path.rstrip("/") if storage.is_gcs(path) else os.path.abspath(path))
  policy = path if (path / "params").is_dir() else None
  latest = reload.latest_version(path)
  if policy is None and latest is not None and (path / str(latest) / "params").is_dir():
    policy = path / str(latest)
  if policy is not None:  # one policy version: params (+ router bias when it was saved)
    return _from_pure(reload.load_policy(policy, nnx.merge_state(params, rest)), params, rest)
  ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  mgr = ocp.CheckpointManager(ckdir)
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"--init_checkpoint={path} holds no SFT checkpoint (checkpoints/<step>)"
                            " nor a policy dir (<version>/params); pass the SFT run directory")
  target = {"params": checkpoint.abstract_like(params), "rest": checkpoint.abstract_like(rest)}
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  mgr.close()
  logging.info("init: params + router bias from SFT checkpoint %s step %d", ckdir, step)
  return out["state"]["params"], out["state"]["rest"]


def _from_pure(pure: dict, params: Any, rest: Any) -> tuple[Any, Any]:
  """Copies of (params, rest) with the leaves found in the pure dict `pure` replaced."""
  from flax import nnx  # noqa: PLC0415
  new_p, new_r = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, rest)
  flat = dict(nnx.traversals.flatten_mapping(pure))
  for state in (new_p, new_r):
    keys = {k for k, _ in nnx.traversals.flatten_mapping(state.to_pure_dict()).items()}
    part = nnx.traversals.unflatten_mapping({k: v for k, v in flat.items() if k in keys})
    if part:
      nnx.replace_by_pure_dict(state, part)
  return new_p, new_r


def policy_tree(params: Any, rest: Any) -> dict:
  """What a policy version holds: params + router bias state, as one pure dict (what servers
  load with `reload.load_policy`), so sampler and trainer route tokens identically."""
  from flax import nnx  # noqa: PLC0415
  return nnx.merge_state(params, rest).to_pure_dict()


def stream_config(config: ml_collections.ConfigDict, stream: str, sync: bool) -> StreamConfig:
  d, r = config.data, config.rl
  return StreamConfig(
      stream=stream, batch_size=d.batch_size, row_len=d.row_len,
      split=SplitConfig(max_len=d.max_len, overlap=d.overlap,
                        completion_tokens=d.completion_tokens,
                        train_overlap=d.train_overlap),
      groups_per_step=r.groups_per_step, max_staleness=0 if sync else r.max_staleness,
      normalize_std=r.normalize_std, vocab_size=config.model.vocab_size,
      prev_stage=r.prev_stage, poll_s=r.poll_s, wait_timeout_s=r.wait_timeout_s,
      temperature=float(r.get("temperature", 1.0)), routing_shape=_routing_shape(config),
      **signal_fields(config, sync))


def signal_fields(config: ml_collections.ConfigDict, sync: bool = False) -> dict[str, Any]:
  """The StreamConfig fields of issue #31's coverage and signal switches (rl.*; absent = off):
  dynamic sampling, family mixing, length-cut masking, minibatches formed by trajectories.
  Sync mode has no dynamic sampling: its workers make one group per worker and policy version,
  so a step that asked for more would wait forever."""
  r = config.rl
  dynamic = bool(r.get("dynamic_sampling", False))
  if dynamic and sync:
    logging.info("rl.dynamic_sampling is off in sync mode (one group per worker and version)")
  return dict(dynamic_sampling=dynamic and not sync,
              dynamic_sampling_max_reads=int(r.get("dynamic_sampling_max_reads", 0)),
              family_lookahead=int(r.get("family_lookahead", 0)),
              length_cut=str(r.get("length_cut", "train")),
              updates_per_step=int(r.get("updates_per_step", 0)),
              micro_rows=config.data.batch_size // int(r.get("minibatches", 1)),
              seed=int(config.get("seed", 0)))


def _routing_shape(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(MoE layers, top-k) of the batches' `routing` under routing replay (rl.routing_replay)."""
  if not rl_step.routing_replay(config.rl):
    return None
  from klong_jax.model.config import from_config_dict  # noqa: PLC0415
  m = from_config_dict(config.model)
  return (m.num_moe_layers, m.num_experts_per_tok)


class Publisher:
  """Publishes params as policy versions under `<workdir>/policy` and writes control.json."""

  def __init__(self, workdir: str, stream: str, curriculum: curriculum_lib.Curriculum,
               sync: bool, dtype: Any = None, background: bool = True):
    self.root = str(reload.policy_root(workdir))
    self.stream, self.curriculum, self.sync = stream, curriculum, sync
    self.version = -1
    # Versions hold the weights in the model's compute dtype (model/precision.py: bf16 matmul
    # weights, fp32 router/norms/biases), what the servers compute with; uploaded in the
    # background (rl.publish_async) while training continues, one in flight at a time.
    self.dtype = dtype
    self._async = reload.AsyncPublisher(self.root, dtype) if background else None

  def publish(self, params: Any, rest: Any) -> int:
    if self._async is not None:
      self._async.wait()  # The previous version landed (and its error, if any, surfaces here).
    self.version = max(self.version, reload.latest_version(self.root) or -1) + 1
    if self._async is not None:
      self._async.publish(self.version, policy_tree(params, rest))
    else:
      reload.save_policy(self.root, self.version, policy_tree(params, rest), dtype=self.dtype)
    logging.info("published policy version %d%s", self.version,
                 " (uploading in the background)" if self._async is not None else "")
    return self.version

  def close(self) -> None:
    """Waits for the version uploading now (at exit; raises its error)."""
    if self._async is not None:
      self._async.close()

  def write_control(self, min_version: int | None = None) -> None:
    if min_version is None:
      min_version = self.version if self.sync else -1
    write_json_atomic(os.path.join(self.stream, "control.json"),
                      self.curriculum.control(min_version))


def default_logdir(workdir: str) -> str:
  """Where a run's local logs go: the workdir itself, or for gs:// a dir under $TMPDIR."""
  if not storage.is_gcs(workdir):
    return workdir
  return os.path.join(tempfile.gettempdir(), "klong-logs", *storage.split(workdir.rstrip("/")))


def _mirror_logs(logdir: str, workdir: str) -> None:
  """Copies the local jsonl logs to `<workdir>/logs/` (gs:// workdirs; process 0 only)."""
  if not storage.is_gcs(workdir) or jax.process_index() != 0:
    return
  for name in ("metrics.jsonl", "consumed.jsonl"):
    path = os.path.join(logdir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        storage.write(storage.join(workdir, "logs", name), f.read())


def run(config: ml_collections.ConfigDict, workdir: str, stream: str,
        init_checkpoint: str | None = None, mode: str | None = None, resume: bool = True,
        logdir: str | None = None) -> dict[str, Any]:
  """Trains per `config`; returns a summary (steps, versions, timings, stream counters)."""
  workdir, stream = (p.rstrip("/") if storage.is_gcs(p) else os.path.abspath(p)
                     for p in (workdir, stream))
  logdir = logdir or default_logdir(workdir)
  for d in (workdir, stream, logdir):
    if not storage.is_gcs(d):
      os.makedirs(d, exist_ok=True)
  mode = mode or config.rl.mode
  if mode not in ("async", "sync"):
    raise ValueError(f"rl.mode must be 'async' or 'sync', got {mode!r}")
  sync = mode == "sync"
  rules = tuple(config.get("rules", None) or rules_lib.LOGICAL_RULES)

  logging.info("[1/7] mesh %s on %d devices (%s mode)", dict(config.mesh), jax.device_count(),
               mode)
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sh = rules_lib.batch_sharding(mesh, rules)

  logging.info("[2/7] model, optimizer, shardings")
  mb_rows = rl_step.minibatch_rows(config.rl, config.data.batch_size,
                                   rules_lib.data_parallel_size(batch_sh))
  epochs = int(config.rl.get("ppo_epochs", 1))
  per_step = int(config.rl.get("updates_per_step", 0))  # > 0: exact (rl/minibatch.py)
  updates = updates_per_element(config.rl)
  if updates > 1:  # optim step counts are in elements; the schedule counts optimizer updates
    config = ml_collections.ConfigDict(config.to_dict())  # (legacy: nominal, an element that fits).
    config.optim.total_steps *= updates
    config.optim.warmup_steps *= updates
  model_cfg, graphdef, params, rest, tx, state_sh = step_lib.build_trainer_parts(config, mesh,
                                                                                  rules)

  logging.info("[3/7] checkpoints")
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
      save_every=config.checkpoint.every, async_save=config.checkpoint.async_save)
  resuming = resume and ckpt.latest_step() is not None
  if init_checkpoint and not resuming:
    logging.info("[4/7] init params from %s", init_checkpoint)
    params, rest = load_init_params(init_checkpoint, params, rest)
  else:
    logging.info("[4/7] init params: %s", "from the RL checkpoint" if resuming else
                 "random (no --init_checkpoint)")
  state = step_lib.init_state(params, rest, tx, state_sh)
  ref = rl_step.copy_params(state.params, state_sh.params)
  del params, rest
  train_step = rl_step.make_rl_step(graphdef, tx, config.optim, config.rl, state_sh, batch_sh,
                                    rules)
  accum = (rl_step.make_rl_accum_step(graphdef, tx, config.optim, config.rl, state_sh, batch_sh,
                                      rules) if per_step else None)
  # Decoupled PPO: the proximal policy = the params at the start of each element's updates.
  logp_fn = (rl_step.make_logprob_fn(graphdef, config.optim, config.rl, state_sh, batch_sh, rules)
             if rl_step.off_policy(config.rl) == "decoupled" else None)

  logging.info("[5/7] stream source %s", stream)
  cur = curriculum_lib.Curriculum(curriculum_lib.stages_from_config(config.curriculum.stages),
                                  window=config.curriculum.window,
                                  budget_clock=config.curriculum.get("budget_clock", ""))
  data_iter: StreamIterator = iter(StreamDataset(stream_config(config, stream, sync)))
  pub = Publisher(workdir, stream, cur, sync, dtype=model_cfg.dtype,
                  background=bool(config.rl.get("publish_async", True)))

  if resuming:
    logging.info("[6/7] resume from step %d", ckpt.latest_step())
    both, extra = ckpt.restore({"train": state, "ref": ref}, data_iter=data_iter)
    state, ref = both["train"], both["ref"]
    cur.load_state_dict(extra["curriculum"])
    totals = dict(extra.get("totals", {}))
  else:
    if reload.latest_version(pub.root) is not None:
      raise FileExistsError(f"{pub.root} already holds policy versions but {workdir} has no RL "
                            "checkpoint; use a fresh --workdir")
    logging.info("[6/7] fresh start")
    totals = {}
  pub.publish(state.params, state.rest)  # version 0 (fresh) or the restored params as a new version
  data_iter.set_policy_version(pub.version)
  data_iter.set_stage(cur.index)
  pub.write_control()
  if sync:  # Element assembled: stop the fleet from starting groups on this version.
    data_iter.on_element = lambda it: pub.write_control(pub.version + 1)

  start = ckpt.latest_step() if resuming else 0  # elements trained (state.step counts updates)
  total = config.train.steps
  stop_after = config.train.get("stop_after", -1)
  every = config.rl.publish_every
  logging.info("[7/7] training steps %d..%d, publish every %s", start + 1, total,
               "element" if sync else f"{every} steps")
  peak = devices.peak_flops(jax.devices()[0].device_kind)
  step_flops = flops.train_flops_per_token(model_cfg, config.data.row_len)
  if float(config.rl.get("kl_coef", 0.0)):  # The KL term runs a reference forward too.
    step_flops += flops.forward_flops_per_token(model_cfg, config.data.row_len)
  writer = metrics.MetricsWriter(logdir, total_steps=total, log_every=config.train.log_every,
                                 enabled=jax.process_index() == 0, flops_per_token=step_flops,
                                 peak_flops=None if peak is None else peak * jax.device_count())
  writer.start(start)
  consumed_log = open(os.path.join(logdir, "consumed.jsonl"), "a", encoding="utf-8")
  history: list[dict[str, float]] = []
  train_s, wait_s = float(totals.get("train_s", 0.0)), float(totals.get("wait_s", 0.0))
  t_start = time.perf_counter() - train_s - wait_s
  step = start
  try:
    while step < total:
      t0 = time.perf_counter()
      batch, info = _next_element(data_iter)
      t1 = time.perf_counter()
      ms = []
      stale = rl_step.staleness_metrics(batch["policy_version"], batch["loss_mask"], pub.version)
      if logp_fn is not None:
        batch["prox_logp"] = _proximal_logp(logp_fn, state, batch, mb_rows, batch_sh)
      if accum is not None:
        state, ms, skipped = train_by_trajectories(accum, state, ref, batch, config, mb_rows,
                                                   step + 1, batch_sh)
      else:
        n_mb = _max_over_hosts(rl_step.num_minibatches(batch["loss_mask"], mb_rows))
        for rows in rl_step.update_plan(batch["loss_mask"], mb_rows=mb_rows, epochs=epochs,
                                        seed=config.seed, step=step + 1, minibatches=n_mb):
          mb = {k: batch[k][rows] for k in rl_step.batch_keys(config.rl) if k in batch}
          state, m_i = train_step(state, ref, _global_batch(mb, batch_sh))
          ms.append(m_i)
      if not ms:  # nothing to learn from: no update, the step still counts (exactly once)
        logging.warning("step %d: element of %d trajectories has no loss tokens (%d turns masked "
                        "as cut at max_tokens); no optimizer update", step + 1, len(info["ids"]),
                        info.get("cut_turns_masked", 0))
      m = rl_step.combine_update_metrics(jax.device_get(ms), epochs)
      if accum is not None:  # real optimizer updates, and minibatches no rollout filled
        m["ppo/updates"], m["ppo/updates_skipped"] = float(len(ms)), float(skipped)
      t2 = time.perf_counter()
      step += 1
      wait_s += t1 - t0
      train_s += t2 - t1
      if info["ids"]:
        consumed_log.write(json.dumps({"step": step, "ids": info["ids"]}) + "\n")
        consumed_log.flush()
      reward = float(np.mean(info["rewards"])) if info["rewards"] else None
      elapsed = time.perf_counter() - t_start
      m = dict(m, **data_iter.stats(), **stale, policy_version=pub.version, stage=cur.index,
               **{"dyn/dropped_zero_var_groups": float(info.get("dropped_zero_var", 0))},
               lag=pub.version - info["min_version"], lr=optim.learning_rate(
                   config.optim, (int(state.step) - 1) // int(config.optim.get("grad_accum", 1))),
               utilisation=train_s / max(train_s + wait_s, 1e-9), step_s=t2 - t1,
               wait_step_s=t1 - t0, wall_s=elapsed,
               trajectories_per_hour=data_iter.counters["trajectories_used"] * 3600 / elapsed)
      if reward is not None:
        m["reward/mean"] = reward
        m[f"reward/stage_{cur.index}"] = reward
      history.append(writer.write(step, m))

      if sync or step % every == 0:  # sync: every step is one whole element
        pub.publish(state.params, state.rest)
        data_iter.set_policy_version(pub.version)
        pub.write_control()
      if cur.observe(step, reward):
        new = cur.advance(step)
        ref = rl_step.copy_params(state.params, state_sh.params)
        data_iter.set_stage(cur.index)
        pub.write_control()
        writer.write_text(step, "stage", f"stage {cur.index}: time limit {new.time_limit_s}s")
        logging.info("curriculum: stage %d at step %d (time limit %.0f s); reference policy "
                     "reset, control.json updated", cur.index, step, new.time_limit_s)
      if step == config.train.get("crash_after", -1):  # test hook: die before this save
        raise RuntimeError(f"simulated crash after step {step} (train.crash_after)")
      if ckpt.save(step, {"train": state, "ref": ref}, data_iter=data_iter,
                   extra={"curriculum": cur.state_dict(), "version": pub.version,
                          "totals": {"train_s": train_s, "wait_s": wait_s}},
                   force=step == total or step == stop_after):
        _mirror_logs(logdir, workdir)
      if step == stop_after:
        logging.info("stopping after step %d as configured (train.stop_after)", step)
        break
  except Exception:
    ckpt.wait()
    logging.error("RL training stopped at step %d; newest complete checkpoint: step %s",
                  step + 1, ckpt.latest_step())
    raise
  finally:
    ckpt.close()
    writer.close()
    consumed_log.close()
    _mirror_logs(logdir, workdir)
    pub.close()  # Last: the version in flight lands (or its upload error is raised).
  elapsed = time.perf_counter() - t_start
  summary = {"step": step, "start": start, "version": pub.version, "stage": cur.index,
             "seconds": elapsed, "train_s": train_s, "wait_s": wait_s,
             "utilisation": train_s / max(train_s + wait_s, 1e-9),
             "counters": dict(data_iter.counters), "history": history}
  logging.info("done: step %d, version %d, stage %d, utilisation %.2f, counters %s", step,
               pub.version, cur.index, summary["utilisation"], summary["counters"])
  return dict(summary, state=state, graphdef=graphdef)


def updates_per_element(rl: ml_collections.ConfigDict) -> int:
  """Optimizer updates one trainer step makes, as the LR schedule is stretched by: exactly
  ppo_epochs x rl.updates_per_step, or (legacy, updates_per_step 0) the nominal ppo_epochs x
  rl.minibatches (really ceil(loss rows / minibatch rows) per epoch, rl/step.py)."""
  per_step = int(rl.get("updates_per_step", 0))
  return int(rl.get("ppo_epochs", 1)) * (per_step or int(rl.get("minibatches", 1)))


def _next_element(data_iter: StreamIterator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The next element's packed batches concatenated along rows (one trainer step trains a whole
  element), and the stream's info for it (ids, rewards, versions: from its first batch)."""
  batches = [next(data_iter)]
  info = dict(data_iter.last_info)
  while not data_iter.last_info["element_last"]:
    batches.append(next(data_iter))
  return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}, info


def _max_over_hosts(n: Any) -> Any:
  """Max of a host-local count (or array of counts) over all processes (hosts must run the same
  number of updates)."""
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils  # noqa: PLC0415
  out = np.max(multihost_utils.process_allgather(np.asarray(n)), axis=0)
  return int(out) if np.ndim(n) == 0 else out


def _sum_over_hosts(x: np.ndarray) -> np.ndarray:
  """Sum of a host-local array over all processes (a global batch's loss denominators)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.sum(multihost_utils.process_allgather(np.asarray(x)), axis=0)


def train_by_trajectories(accum: rl_step.AccumStep, state: Any, ref: Any,
                          batch: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                          mb_rows: int, step: int, sharding: jax.sharding.NamedSharding
                          ) -> tuple[Any, list[dict[str, Any]], int]:
  """Trains one element whose rows carry `minibatch` (rl.updates_per_step): ppo_epochs x N
  optimizer updates, one per minibatch (its micro-batches' gradients summed, each normalised by
  the minibatch's denominator). Returns (state, per-update metrics, updates skipped: minibatches
  that no trajectory filled)."""
  n, epochs = int(config.rl.updates_per_step), int(config.rl.get("ppo_epochs", 1))
  keys = [k for k in rl_step.batch_keys(config.rl) if k in batch]
  norm = str(config.rl.get("normalization", "token"))
  rows_of = [np.flatnonzero(batch["minibatch"] == j) for j in range(n)]
  micro = _max_over_hosts(np.asarray([len(r) // mb_rows for r in rows_of], np.int64))
  den = _sum_over_hosts(np.asarray([minibatch.loss_denominator(
      batch["segment_ids"][r], batch["loss_mask"][r], norm) for r in rows_of], np.float64))
  ms, skipped = [], 0
  for j in minibatch.update_order(n, epochs, int(config.seed), step):
    k = int(micro[j])
    if k == 0:
      skipped += 1
      continue
    grads, loads, parts = None, [], []
    for i in range(k):
      rows = rows_of[j][i * mb_rows:(i + 1) * mb_rows]
      mb = {key: _pad_rows(batch[key][rows], mb_rows, -1 if key == "routing" else 0)
            for key in keys}  # short only on a host with fewer rows in this minibatch
      g, m_i = accum.grad(state, ref, _global_batch(mb, sharding), den[j], 1.0 / k)
      grads = g if grads is None else accum.add(grads, g)
      loads.append(m_i.pop("moe_expert_load"))
      parts.append(m_i)
    state, gnorm = accum.apply(state, grads, sum(loads) / len(loads))
    ms.append(dict(rl_step.merge_micro_metrics(jax.device_get(parts)),
                   grad_norm=float(gnorm), micro_batches=float(k)))
  return state, ms, skipped


def _pad_rows(x: np.ndarray, rows: int, fill: int) -> np.ndarray:
  """`x` with padding rows (value `fill`) appended up to `rows`."""
  if x.shape[0] >= rows:
    return x
  pad = np.full((rows - x.shape[0], *x.shape[1:]), fill, x.dtype)
  return np.concatenate([x, pad])


def _proximal_logp(logp_fn: Any, state: Any, batch: dict[str, np.ndarray], mb_rows: int,
                   sharding: jax.sharding.NamedSharding) -> np.ndarray:
  """This host's rows of the proximal log-probs [rows, L] (logits positions) of an element,
  computed `mb_rows` rows at a time with the params before the element's first update."""
  from jax.experimental import multihost_utils  # noqa: PLC0415
  keys = ("tokens", "positions", "segment_ids", "loss_mask", "routing")
  out = []
  for start in range(0, batch["tokens"].shape[0], mb_rows):
    part = {k: batch[k][start:start + mb_rows] for k in keys if k in batch}
    logp = logp_fn(state, _global_batch(part, sharding))
    if jax.process_count() > 1:
      logp = multihost_utils.global_array_to_host_local_array(logp, sharding.mesh, sharding.spec)
    out.append(np.asarray(logp, np.float32))
  return np.concatenate(out)


def _global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
                  ) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in batch}


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other entry points never clashes on flag names)."""
  global _CONFIG, _WORKDIR, _STREAM, _INIT, _MODE, _LOGDIR
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, policy, metrics).")
  _STREAM = flags.DEFINE_string("stream", None,
                                "Trajectory stream directory (shared with workers).")
  _INIT = flags.DEFINE_string("init_checkpoint", None,
                              "SFT run dir / its checkpoints dir, or a policy (version) dir.")
  _MODE = flags.DEFINE_enum("mode", None, ["async", "sync"], "Overrides rl.mode.")
  _LOGDIR = flags.DEFINE_string("logdir", None, "Local dir for metrics.jsonl, tb/, consumed.jsonl "
                                "(default: the workdir; for a gs:// workdir a dir under $TMPDIR).")


def main(argv: list[str]) -> None:
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None or _STREAM.value is None:
    raise app.UsageError("--config, --workdir and --stream are required")
  mesh_lib.maybe_initialize_distributed()  # Multi-host pods: one trainer process per host.
  run(_CONFIG.value, _WORKDIR.value, _STREAM.value, init_checkpoint=_INIT.value,
      mode=_MODE.value, logdir=_LOGDIR.value)


def entry() -> None:
  """Console-script entry point (`klong-rl`)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

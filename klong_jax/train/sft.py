"""Trajectory-splitting SFT trainer: `python -m klong_jax.train.sft --config=... --workdir=...`.

`run(config, workdir)` reads top to bottom as a checklist: mesh, tokenizer + data, model,
shardings, init or resume, loop (step, metrics, checkpoints). Each stage logs a line, so a hang
shows where it stopped. With `--resume` (or `resume=True`) the params, optimizer state, step and
the Grain iterator position are restored from the newest checkpoint in `<workdir>/checkpoints`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from klong_jax.data import chat, pipeline, shards, synthetic, tokenizer
from klong_jax.data.splitting import SplitConfig
from klong_jax.parallel import mesh as mesh_lib
from klong_jax.parallel import rules as rules_lib
from klong_jax.perf import devices, flops
from klong_jax.train import checkpoint, metrics, optim
from klong_jax.train import step as step_lib

_CONFIG: Any = None
_WORKDIR: Any = None
_RESUME: Any = None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer.Tokenizer:
  """The configured tokenizer file, or the bundled tiny SentencePiece model (cached)."""
  if config.data.tokenizer:
    return tokenizer.load(config.data.tokenizer)
  cache = config.data.tokenizer_cache or os.path.join(workdir, "tokenizer")
  return tokenizer.default_tokenizer(cache, vocab_size=config.model.vocab_size)


def resolve_shards(config: ml_collections.ConfigDict, workdir: str,
                   fmt: chat.ChatFormat) -> list[str]:
  """Shard files from `data.shards`, or synthetic shards written once to `<workdir>/data`."""
  if config.data.shards:
    paths = shards.list_shards(config.data.shards)
    if not paths:
      raise FileNotFoundError(f"data.shards={config.data.shards!r} holds no ArrayRecord shards")
    return paths
  data_dir = os.path.join(workdir, "data")
  paths = shards.list_shards(data_dir) if os.path.isdir(data_dir) else []
  if not paths:
    logging.info("data: writing %d synthetic trajectories to %s", config.data.synthetic_count,
                 data_dir)
    paths = synthetic.write_synthetic_shards(data_dir, fmt, config.data.synthetic_count,
                                             seed=config.data.shuffle_seed)
  return paths


def pipeline_config(config: ml_collections.ConfigDict, vocab_size: int) -> pipeline.PipelineConfig:
  """The data section as a PipelineConfig; this host's slice of the global batch."""
  d = config.data
  if d.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size={d.batch_size} must divide over "
                     f"{jax.process_count()} processes")
  return pipeline.PipelineConfig(
      batch_size=d.batch_size // jax.process_count(), row_len=d.row_len,
      split=SplitConfig(max_len=d.max_len, overlap=d.overlap,
                        completion_tokens=d.completion_tokens,
                        train_overlap=d.train_overlap, truncate=d.truncate),
      seed=d.shuffle_seed, num_epochs=d.num_epochs or None, num_workers=d.worker_count,
      strict=d.strict, vocab_size=vocab_size, process_index=jax.process_index(),
      process_count=jax.process_count())


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
                 ) -> dict[str, jax.Array]:
  """Host-local [b, L] numpy rows -> global [B, L] arrays laid out on `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in step_lib.BATCH_KEYS}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cross-section consistency, with errors that name the fields to change."""
  accum = int(config.optim.grad_accum)
  if config.train.steps % accum:
    raise ValueError(f"train.steps={config.train.steps} must be a multiple of "
                     f"optim.grad_accum={accum}")
  if config.optim.total_steps != config.train.steps // accum:
    raise ValueError(f"optim.total_steps={config.optim.total_steps} must equal train.steps / "
                     f"grad_accum = {config.train.steps // accum} (the schedule counts updates)")


def run(config: ml_collections.ConfigDict, workdir: str, resume: bool = False
        ) -> dict[str, Any]:
  """Trains per `config` in `workdir`; returns a summary (final step, losses, timings)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_config(config)
  if config.train.compilation_cache_dir:
    # Persistent XLA cache: a resumed or repeated run skips recompiling the same step.
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  rules = tuple(config.rules or rules_lib.LOGICAL_RULES)

  logging.info("[1/6] mesh %s on %d devices", dict(config.mesh), jax.device_count())
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sh = rules_lib.batch_sharding(mesh, rules)

  logging.info("[2/6] tokenizer + data")
  tok = load_tokenizer(config, workdir)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer vocab {tok.vocab_size} exceeds model.vocab_size "
                     f"{config.model.vocab_size}; raise the model vocab or use a smaller tokenizer")
  fmt = chat.ChatFormat(tok)
  paths = resolve_shards(config, workdir, fmt)
  data_iter = pipeline.make_sft_iterator(paths, pipeline_config(config, tok.vocab_size))
  logging.info("data: %d shard(s), row_len %d, global batch %d", len(paths), config.data.row_len,
               config.data.batch_size)

  logging.info("[3/6] model, optimizer, shardings")
  model_cfg, graphdef, params, rest, tx, state_sh = step_lib.build_trainer_parts(config, mesh,
                                                                                  rules)

  logging.info("[4/6] train state")
  state = step_lib.init_state(params, rest, tx, state_sh)
  del params, rest
  train_step = step_lib.make_sft_step(graphdef, tx, config.optim, state_sh, batch_sh, rules)

  ck_cfg = config.checkpoint
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=ck_cfg.max_to_keep,
      save_every=ck_cfg.every, async_save=ck_cfg.async_save,
      best_metric=ck_cfg.best_metric or None, best_mode=ck_cfg.best_mode)
  if resume and ckpt.latest_step() is not None:
    logging.info("[5/6] resume from step %d", ckpt.latest_step())
    state, _ = ckpt.restore(state, data_iter=data_iter)
  else:
    logging.info("[5/6] fresh start%s", " (no checkpoint to resume)" if resume else "")
  start = int(state.step)

  total = config.train.steps
  stop_after = config.train.stop_after
  logging.info("[6/6] training steps %d..%d", start + 1, total)
  peak = devices.peak_flops(jax.devices()[0].device_kind)
  writer = metrics.MetricsWriter(
      workdir, total_steps=total, log_every=config.train.log_every,
      enabled=jax.process_index() == 0,
      flops_per_token=flops.train_flops_per_token(model_cfg, config.data.row_len),
      peak_flops=None if peak is None else peak * jax.device_count())
  writer.start(start)
  history: list[dict[str, float]] = []
  rejected = 0
  t0 = time.perf_counter()
  step = start
  try:
    while step < total:
      batch = next(data_iter)
      rejected += int(np.sum(batch.get("num_rejected", 0)))
      state, m = train_step(state, global_batch(batch, batch_sh))
      step += 1
      m = dict(m, lr=optim.learning_rate(config.optim, (step - 1) // optim_accum(config)),
               rejected_records=rejected)
      history.append(writer.write(step, m))
      ckpt.save(step, state, data_iter=data_iter, metrics={"loss": history[-1]["loss"]},
                force=step == total)
      if step == stop_after:
        logging.info("stopping after step %d as configured (train.stop_after)", step)
        break
  except Exception:
    ckpt.wait()
    logging.error("training stopped at step %d; the newest complete checkpoint (step %s) is "
                  "untouched", step + 1, ckpt.latest_step())
    raise
  finally:
    ckpt.close()
    writer.close()
  elapsed = time.perf_counter() - t0
  logging.info("done: step %d, %.1f s, rejected records %d", step, elapsed, rejected)
  return {"step": step, "start": start, "history": history, "seconds": elapsed,
          "rejected_records": rejected, "state": state, "graphdef": graphdef,
          "shards": paths, "tokenizer": tok}


def optim_accum(config: ml_collections.ConfigDict) -> int:
  return int(config.optim.grad_accum)


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other entry points never clashes on flag names)."""
  global _CONFIG, _WORKDIR, _RESUME
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, data).")
  _RESUME = flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in workdir.")


def main(argv: list[str]) -> None:
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  mesh_lib.maybe_initialize_distributed()  # Multi-host pods: one trainer process per host.
  run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)


def entry() -> None:
  """Console-script entry point (`klong-sft`)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()

"""Run every role of an experiment on this machine: trainer, server, N rollout workers.

  python launch/local.py --config=configs/demo.py --workdir=runs/local [--dry_run]
      [--init_checkpoint=runs/demo/sft/checkpoints] [--sweep=rl.mode=sync --sweep=seed=1]

xmanager shape (`Experiment -> Job -> Executable`, klong_jax/launch/experiment.py) in plain Python
with absl flags. Each role logs to `<workdir>/logs/<role>.log`; Ctrl-C or SIGTERM stops every
role (SIGTERM, then SIGKILL after a grace period). `--sweep` (repeatable, "k=v,k=v") runs one
work unit per override set, one after another, in `<workdir>/wu<i>`. `--dry_run` prints the plan.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if __package__ in (None, ""):  # `python launch/local.py`: make the repo root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from klong_jax import config_util  # noqa: E402
from klong_jax.launch import experiment as xp  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/demo.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (logs, stream, policy, ckpts).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would be launched; start nothing.")
_INIT = flags.DEFINE_string("init_checkpoint", "", "SFT checkpoint the trainer starts from.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer file; '' = the bundled one.")
_TASKS = flags.DEFINE_string("tasks", "", "Dir of RL task dirs; '' = the bundled suite's "
                             "config.tasks.rl_split tasks.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "Override set 'k=v,k=v' (one work unit each).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 0.0, "Stop the roles after this long (0 = config).")


def parse_overrides(text: str) -> dict[str, str]:
  """'a.b=1,c=x' -> {'a.b': '1', 'c': 'x'}; typed by the field each replaces when applied."""
  return config_util.parse_kv(text)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides; unknown keys raise naming the valid ones."""
  return config_util.apply_overrides(config, overrides, what="sweep")


def work_units(config: ml_collections.ConfigDict, workdir: str, sweep: list[str], *,
               init_checkpoint: str = "", tokenizer: str = "", tasks: str = "",
               dry_run: bool = False) -> list[xp.Experiment]:
  """One RL Experiment per sweep entry (or one when there is no sweep)."""
  sets = [parse_overrides(s) for s in sweep] or [{}]
  units = []
  for i, ov in enumerate(sets):
    c = apply_overrides(config, ov)
    wd = os.path.abspath(os.path.join(workdir, f"wu{i}") if sweep else workdir)
    tok = tokenizer or _default_tokenizer(c, wd, dry_run)
    task_dir = tasks or _rl_tasks(c, wd, dry_run)
    exp = xp.rl_experiment(c, wd, init_checkpoint=init_checkpoint or None, tokenizer=tok,
                           tasks=task_dir)
    if ov:
      exp.name += "-" + ",".join(f"{k}={v}" for k, v in ov.items())
    units.append(exp)
  return units


def _default_tokenizer(c: ml_collections.ConfigDict, wd: str, dry_run: bool) -> str:
  cache = os.path.join(wd, "tokenizer")
  if dry_run:
    return os.path.join(cache, f"<demo sentencepiece, vocab {c.tokenizer.vocab_size}>.model")
  from klong_jax.demo import domain_tokenizer  # noqa: PLC0415
  from klong_jax.tasks import bundled_tasks_dir  # noqa: PLC0415
  return str(domain_tokenizer.from_config(c, c.tasks.root or bundled_tasks_dir(), cache).path)


def _rl_tasks(c: ml_collections.ConfigDict, wd: str, dry_run: bool) -> str:
  from klong_jax.tasks import bundled_tasks_dir  # noqa: PLC0415
  if dry_run:
    return xp.rl_tasks_dir(wd)
  return xp.link_rl_tasks(c, c.tasks.root or bundled_tasks_dir(), wd)


def main(argv: list[str]) -> None:
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  units = work_units(_CONFIG.value, _WORKDIR.value, _SWEEP.value, init_checkpoint=_INIT.value,
                     tokenizer=_TOKENIZER.value, tasks=_TASKS.value, dry_run=_DRY_RUN.value)
  for i, exp in enumerate(units):
    print(f"work unit {i + 1}/{len(units)}")
    print(exp.describe(), flush=True)
    if _DRY_RUN.value:
      continue
    codes = xp.run_local(exp, timeout_s=_TIMEOUT.value or _CONFIG.value.rl.timeout_s)
    print(f"work unit {i + 1} finished: exit codes {codes}", flush=True)


if __name__ == "__main__":
  app.run(main)

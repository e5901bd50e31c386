"""Split-SFT of the tiny MoE on the bundled synthetic trajectories (CPU, about a minute).

  python -m klong_jax.train.sft --config=configs/sft_tiny.py --workdir=runs/sft_tiny [--resume]

Arg string (comma-separated key=value, all optional): `steps=200`, `runlocal` (a few steps, for
smoke tests). Sections: model + mesh (from configs/tiny.py), data, optim, train, checkpoint.
"""

import ml_collections

from configs import common, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny split-SFT experiment; see the module docstring for the arg string."""
  args = common.parse_arg(arg, steps=150, runlocal=False)
  config = tiny.get_config()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.shards = ""            # Glob/dir of ArrayRecord trajectory shards; "" = synthetic.
  config.data.synthetic_count = 256  # Written to <workdir>/data when no shards are given.
  config.data.tokenizer_cache = ""   # "" = <workdir>/tokenizer.
  config.data.tokenizer = ""         # "" = the bundled tiny SentencePiece model.
  config.data.max_len = 1024         # Chunk length cap (trajectory splitting).
  # The agent's context policy (data/context.py): chunks = the contexts the rollouts were
  # sampled under, so these equal the workers' context_tokens / context_overlap /
  # max_completion_tokens (0 = reply budget unknown: fit each action's actual length).
  config.data.overlap = 32           # History tokens a new window repeats as context (no loss).
  config.data.completion_tokens = 0
  config.data.truncate = False       # True: first max_len tokens only (the ablation's baseline).
  config.data.train_overlap = False  # True: the paper's variant (overlap tokens trained again).
  config.data.row_len = 1024         # Packed row length.
  config.data.batch_size = 8         # Rows per step (global).
  config.data.shuffle_seed = 0
  config.data.num_epochs = 1000      # Effectively repeat; the step count ends training.
  config.data.worker_count = 0       # Grain worker processes (0 = in-process).
  config.data.strict = False         # True: a malformed record stops training.

  # total_steps: optimizer updates (train.steps / grad_accum).
  config.optim = common.optim_config(config.model, lr=3e-3, warmup_steps=10,
                                     total_steps=args.steps, final_lr_ratio=0.1,
                                     weight_decay=0.01, compute_dtype="float32")

  config.train = ml_collections.ConfigDict()
  config.train.steps = args.steps    # Train steps (batches); = total_steps * grad_accum.
  config.train.log_every = 10
  config.train.stop_after = -1       # >= 0: stop (as if killed) after this step; for tests.
  config.train.compilation_cache_dir = ""  # Persistent XLA cache dir ("" = off).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 50
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  config.checkpoint.best_metric = ""  # e.g. "loss" to keep the best instead of the newest.
  config.checkpoint.best_mode = "min"

  if args.runlocal:
    config.data.synthetic_count = 32
    config.train.steps = 6
    config.optim.total_steps = 6
    config.optim.warmup_steps = 2
    config.train.log_every = 2
    config.checkpoint.every = 3
  return config

"""Progressive RL of the tiny MoE on the bundled tasks (CPU demo size).

  python -m klong_jax.rl.train --config=configs/rl_tiny.py --workdir=runs/rl --stream=runs/stream \\
      --init_checkpoint=runs/sft_tiny [--mode=async|sync]

Arg string (comma-separated key=value, all optional): `steps=40`, `batch=2`, `row_len=512`,
`groups=1` (groups per step = one element), `epochs=1`, `updates=2` (an element is trained in
epochs x updates optimizer updates, each over whole trajectories in micro-batches of
batch / minibatches rows; updates=0: epochs x ceil(loss rows / (batch / minibatches))),
`minibatches=1`, `staleness=1`,
`publish=2`, `mode=async`, `off_policy=none|decoupled` (rl.off_policy), `limits=20:40:60` (stage
time limits, seconds), `runlocal` (tests: a few steps, checkpoint every step, two short stages).
Sections: model + mesh (configs/tiny.py), data, rl, curriculum, optim, train, checkpoint.
"""

import ml_collections

from configs import common, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny progressive-RL experiment; see the module docstring for the arg string."""
  args = common.parse_arg(arg, steps=40, batch=2, row_len=512, groups=1, staleness=1, publish=2,
                          mode="async", off_policy="none", stage_steps=20, epochs=1,
                          minibatches=1, updates=2,
                          limits="20:40:60", runlocal=False)
  config = tiny.get_config()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.max_len = args.row_len  # Chunk length cap (same splitting as SFT).
  # The workers' context policy (data/context.py): overlap = context_overlap, completion_tokens
  # = max_completion_tokens, max_len = context_tokens, so chunks are the sampled contexts.
  config.data.overlap = 32           # History tokens a new window repeats as context (no loss).
  config.data.completion_tokens = 0
  config.data.train_overlap = False
  config.data.row_len = args.row_len  # Packed row length.
  # Packed rows per batch (global); an element overflowing it spans several batches, and one
  # optimizer update trains batch_size / rl.minibatches rows.
  config.data.batch_size = args.batch

  config.rl = ml_collections.ConfigDict()
  config.rl.mode = args.mode          # "async" (overlap) or "sync" (generate -> train baseline).
  config.rl.groups_per_step = args.groups  # Group shards packed into one element (>= 1 step).
  config.rl.max_staleness = args.staleness  # Async: drop trajectories > this many versions old.
  config.rl.publish_every = args.publish  # Async: publish a policy version every K steps.
  config.rl.publish_async = True  # Upload versions in the background (training continues).
  # PPO epochs x minibatches per element (verl's ppo_epochs / mini-batches): each epoch
  # reshuffles the rows; optim step counts below are in elements, stretched by the trainer.
  config.rl.ppo_epochs = args.epochs
  config.rl.minibatches = args.minibatches
  config.rl.normalize_std = False     # Advantage = reward - group mean (KLong: no std division).
  config.rl.clip_low = 0.2
  config.rl.clip_high = 0.28
  config.rl.temperature = 1.0         # = the workers' sampling temperature (logprobs use it).
  config.rl.kl_coef = 0.01            # KL(pi || pi_ref), pi_ref = params at the stage start.
  config.rl.kl_estimator = "k3"
  # Per-token KL bound (verl's low_var_kl: 10; 0 = off): an unclamped k3 token at 15000 once
  # made a demo step's mean KL 7.6 and its clipped gradient mostly KL.
  config.rl.kl_clamp = 10.0
  config.rl.ratio_cap = 4.0           # Dual-clip cap on stale tokens' ratio (0 = off).
  config.rl.normalization = "token"   # or "sequence" (the paper's 1/(n*K) over chunks).
  # Off-policy correction (rl/losses.py): "none" = PPO ratio vs the sampler; "decoupled" = clip vs
  # the proximal policy (the step's starting params), tokens weighted by pi_prox/mu bounded by
  # is_cap: truncated ("truncate", TIS) or zeroed outside [1/cap, cap] ("mask", MIS), per token
  # or per chunk (is_level "sequence": the chunk's geometric mean).
  config.rl.off_policy = args.off_policy
  config.rl.is_level = "token"
  config.rl.is_mode = "truncate"
  config.rl.is_cap = 2.0
  config.rl.prev_stage = "drain"      # Older stages' unread shards: "drain" (train) or "drop".
  # Routing replay (R3, issue #21): the server records each token's MoE expert ids, the workers
  # keep them in the trajectory (schema 2) and the trainer's forwards replay that selection
  # (gate weights still from its own router, so the router learns). Tokens without a record
  # (teacher data, an endpoint that returns none) use the router's own top-k. False: recompute.
  config.rl.routing_replay = True
  # Coverage and signal (configs/common.py): dynamic sampling, family mixing, length-cut
  # masking, `updates` optimizer updates per step (x ppo_epochs) over trajectory minibatches.
  common.rl_signal_config(config.rl, groups_per_step=args.groups, updates_per_step=args.updates)
  config.rl.poll_s = 0.2
  config.rl.wait_timeout_s = 900.0

  # `limits=A:B:C`: one stage per rollout time limit; one limit = fixed-limit RL.
  config.curriculum = common.curriculum_config(args.limits, args.stage_steps, "rl_tiny")
  # Stage limits on the deterministic token clock (agent/budget.py; the workers' rates): the
  # same cuts on an idle or a loaded box.
  config.curriculum.budget_clock = "tokens"

  config.optim = common.optim_config(config.model, lr=3e-4, warmup_steps=2,
                                     total_steps=args.steps, final_lr_ratio=0.5,
                                     weight_decay=0.0, compute_dtype="float32")

  config.train = ml_collections.ConfigDict()
  config.train.steps = args.steps
  config.train.log_every = 5
  config.train.stop_after = -1       # >= 0: stop cleanly (checkpointed) after this step.
  config.train.crash_after = -1      # >= 0: raise before the save of this step (restart tests).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 10
  config.checkpoint.max_to_keep = 2
  config.checkpoint.async_save = True

  if args.runlocal:
    config.train.log_every = 1
    config.checkpoint.every = 1
    config.checkpoint.async_save = False
    config.curriculum.stages = [dict(time_limit_s=5.0, steps=args.stage_steps),
                                dict(time_limit_s=10.0)]
    config.rl.wait_timeout_s = 60.0
  return config

"""Progressive RL of GLM-4.5-Air on a TPU pod: the default `--trainer_config` of launch/tpu.py.

  python launch/tpu.py --config=configs/glm45_air.py --trainer_config=configs/rl_glm45_air.py \\
      --tpu=v5p-256 --workdir=gs://BUCKET/runs/r1 --init_checkpoint=gs://BUCKET/sft/checkpoints \\
      [--dry_run]

The trainer runs on every host of the slice (32 on v5p-256); servers and the rollout fleet are
started by the launcher. Run state (stream, policy versions, Orbax checkpoints) lives under the
gs:// workdir.

Batch: one element (8 groups x 8 rollouts, each trajectory chunked into 32K-token rows) is
trained in rl.minibatches=4 PPO updates of data.batch_size / 4 rows, and each update's rows are
split over the batch mesh axes data x fsdp x expert = 128 chips on v5p-256 (fsdp=-1 x expert=8).
So data.batch_size must be a multiple of 4 x 128 = 512: the default 512 rows (16.8M tokens, about
64 long trajectories of ~8 chunks) gives one 32K row per chip per update. 32 rows cannot start
there. Fewer rows need devices on the tensor axis (`--config.mesh.tensor=4`: 32 batch devices,
batch=128) or fewer minibatches; on v6e-256 (256 chips) use batch=1024 or tensor=2.
`launch/tpu.py --dry_run` runs these checks (klong_jax/launch/checks.py) and names the fix; the
memory plan: `python -m klong_jax.launch.plan --config=configs/rl_glm45_air.py
--topology=v5p-256 --step=rl`.

Arg string (comma-separated key=value, all optional): `steps=200`, `batch=512`
(global packed rows per element; a multiple of rl.minibatches x data x fsdp x expert),
`seq_len=32768` (chunk = the workers' context), `groups=8` (groups per step), `stage_steps=50`,
`limits=3600:7200:14400:21600` (stage time limits, seconds: KLong's growing rollout budgets),
`remat=full|save_dots|none`, `moe_chunk=4096` (model.moe_token_chunk: MoE over each row in
chunks of this many tokens; 0 = off), `context=1` (mesh.context: chips per row's sequence; v6e
needs 2 at 32K, docs/performance.md). Sections: model + mesh (glm45_air preset), rules, data, rl,
curriculum, optim, train, checkpoint, workers (the fleet's episode budget); the same structure as
configs/rl_tiny.py.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pod progressive-RL experiment; see the module docstring for the arg string."""
  args = common.parse_arg(arg, steps=200, batch=512, seq_len=32768, groups=8, stage_steps=50,
                          limits="3600:7200:14400:21600", remat="full", moe_chunk=4096,
                          context=1)
  config = common.glm45_air_pod_config(args)  # fsdp fills the slice, expert=8, seed 0.

  config.data = ml_collections.ConfigDict()
  config.data.max_len = args.seq_len  # Chunk length = the workers' --context_tokens.
  config.data.overlap = 2048         # = the workers' --context_overlap.
  config.data.completion_tokens = 4096  # = the workers' --max_completion_tokens.
  config.data.train_overlap = False
  config.data.row_len = args.seq_len
  config.data.batch_size = args.batch

  config.rl = ml_collections.ConfigDict()
  config.rl.mode = "async"
  config.rl.groups_per_step = args.groups
  # Multi-hour rollouts live through many publishes: the decoupled loss below keeps them with
  # bounded weights, and max_staleness is only the hard cap on a trajectory's oldest version
  # (a 6 h rollout at a few minutes per step spans tens of versions).
  config.rl.max_staleness = 64
  config.rl.publish_every = 1
  config.rl.publish_async = True  # Upload versions in the background (training continues).
  config.rl.ppo_epochs = 1
  config.rl.minibatches = 4
  config.rl.normalize_std = False    # Advantage = reward - group mean (KLong: no std division).
  config.rl.clip_low = 0.2
  config.rl.clip_high = 0.28
  config.rl.temperature = 1.0        # = the workers' --temperature.
  config.rl.kl_coef = 0.001
  config.rl.kl_estimator = "k3"
  config.rl.kl_clamp = 10.0
  # Routing replay (R3): replay the sampler's recorded expert selection in the trainer's
  # forwards (workers' --routing_replay records it); False recomputes the routing.
  config.rl.routing_replay = True
  config.rl.ratio_cap = 4.0
  config.rl.normalization = "token"
  # Off-policy correction (rl/losses.py): clip vs the proximal policy (the params at the start of
  # each step, recomputed on the element), tokens weighted by pi_prox / mu truncated at is_cap.
  config.rl.off_policy = "decoupled"
  config.rl.is_level = "token"
  config.rl.is_mode = "truncate"
  config.rl.is_cap = 2.0
  config.rl.prev_stage = "drain"
  # Coverage and signal (configs/common.py): 4 optimizer updates per step over whole trajectories.
  common.rl_signal_config(config.rl, groups_per_step=args.groups, updates_per_step=4)
  config.rl.poll_s = 1.0
  config.rl.wait_timeout_s = 4 * 3600.0  # A stage's rollouts take hours.

  # `limits=A:B:C`: one stage per rollout time limit; one limit = fixed-limit RL.
  config.curriculum = common.curriculum_config(args.limits, args.stage_steps, "rl_glm45_air")
  config.curriculum.budget_clock = "wall"  # Stage limits in wall seconds (a dedicated pod).

  config.optim = common.optim_config(config.model, lr=1e-6, warmup_steps=5,
                                     total_steps=args.steps, final_lr_ratio=0.5,
                                     weight_decay=0.0, compute_dtype="bfloat16")

  config.train = ml_collections.ConfigDict()
  config.train.steps = args.steps
  config.train.log_every = 1
  config.train.stop_after = -1
  config.train.crash_after = -1

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 10
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  # The rollout fleet launch/tpu.py starts (klong_jax.rollout.worker flags).
  config.workers = ml_collections.ConfigDict()
  config.workers.group_size = 8      # Rollouts per task (the RL group).
  config.workers.max_steps = 1000
  config.workers.time_limit_s = 7200.0  # Used before the trainer writes control.json.
  # Episode checkpoints (rollout/episode_ckpt.py) every this many seconds of agent time: a
  # preempted or crashed multi-hour rollout resumes there, losing at most this much agent work.
  config.workers.ckpt_every_s = 600.0
  # Clock of the stage limits: "wall" on a dedicated pod; "tokens" is the deterministic one
  # (agent/budget.py), whose rates each trajectory's metadata `budget` lets a pod run calibrate:
  # `python -m klong_jax.agent.calibrate --stream=<the run's stream>` prints the overrides.
  config.workers.budget_clock = "wall"
  config.workers.prefill_s_per_token = 0.0005  # Token clock: s per prefill token not reused.
  config.workers.decode_s_per_token = 0.02     # Token clock: s per generated token.
  config.workers.tool_cost = "cpu"     # Token clock: tools by sandbox CPU time (or the table).
  config.workers.tool_costs = "default=1.0"  # Token clock: per-tool seconds NAME=S,...
  return config

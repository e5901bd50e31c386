"""Split-SFT of GLM-4.5-Air on a TPU pod (v5p-256: 128 chips, 32 hosts; or v6e-256).

  python -m klong_jax.train.sft --config=configs/sft_glm45_air.py --workdir=gs://BUCKET/sft \\
      --config.data.shards=gs://BUCKET/distill/sft --config.data.tokenizer=/gcs/tokenizer.json

run on every host of the slice (env contract in docs/tpu_pod.md). Checkpoints (Orbax, async) go
to `<workdir>/checkpoints`, gs:// natively; `--resume` continues from the newest. Check memory
first, with the TPU compiler: `python -m klong_jax.launch.plan --config=configs/sft_glm45_air.py
--topology=v5p-256` (batch and seq_len from this config; the mesh resolved on the slice).

Batch: rows are split over the batch mesh axes data x fsdp x expert (parallel/rules.py
`act_batch`), which on v5p-256 with fsdp=-1 x expert=8 is all 128 chips, so the global batch
must be a multiple of 128: the default 128 is one 32K-token row per chip per step (4.2M tokens),
the smallest step this mesh can run (32 rows cannot start: 128 chips cannot share 32 rows). A
smaller step needs devices on the tensor axis (rows are not split over it): e.g.
`--config.mesh.tensor=4` (fsdp 4 x expert 8 x tensor 4) runs batch=32. On v6e-256 (256 chips)
use batch=256 or tensor=2. `launch/tpu.py --dry_run` and `launch.plan` refuse a batch that does
not divide, naming the fix.

Arg string (comma-separated key=value, all optional): `steps=2000`, `batch=128` (global packed
rows per step; a multiple of data x fsdp x expert), `seq_len=32768` (chunk = row = the agent's
context, the workers' --context_tokens), `remat=full|save_dots|none`, `moe_chunk=4096`
(model.moe_token_chunk: MoE over each row in chunks of this many tokens; 0 = off), `context=1`
(mesh.context: chips per row's sequence, context parallelism; v6e-256 at 32K:
`context=2,batch=128`, docs/performance.md). Sections: model + mesh (the
glm45_air preset: bf16 activations, fp32 master params, fsdp=-1 x expert=8), rules, data, optim,
train, checkpoint; the same structure as configs/sft_tiny.py.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pod split-SFT experiment; see the module docstring for the arg string."""
  args = common.parse_arg(arg, steps=2000, batch=128, seq_len=32768, remat="full",
                          moe_chunk=4096, context=1)
  # fsdp fills the slice (16 on v5p-256, 32 on v6e-256); 128 experts over expert=8 (16 each).
  config = common.glm45_air_pod_config(args)

  config.data = ml_collections.ConfigDict()
  config.data.shards = "gs://BUCKET/distill/sft"  # Distilled ArrayRecord trajectory shards.
  config.data.synthetic_count = 0    # Never used: shards are required on a pod.
  config.data.tokenizer_cache = ""   # "" = <workdir>/tokenizer.
  config.data.tokenizer = "/gcs/glm45_air/tokenizer.json"  # The model's own tokenizer.
  config.data.max_len = args.seq_len  # Chunk length = the agent's context (workers' context).
  # The context policy (data/context.py): equal to the workers' --context_overlap and
  # --max_completion_tokens, so chunks are the contexts each action was taken under.
  config.data.overlap = 2048
  config.data.completion_tokens = 4096
  config.data.truncate = False       # True: first max_len tokens only (the ablation's baseline).
  config.data.train_overlap = False
  config.data.row_len = args.seq_len  # Packed row length.
  config.data.batch_size = args.batch  # Global rows per step (each host loads batch / hosts).
  config.data.shuffle_seed = 0
  config.data.num_epochs = 1000      # Effectively repeat; the step count ends training.
  config.data.worker_count = 8       # Grain worker processes per host.
  config.data.strict = False

  config.optim = common.optim_config(config.model, lr=1e-5, warmup_steps=50,
                                     total_steps=args.steps, final_lr_ratio=0.1,
                                     weight_decay=0.01, compute_dtype="bfloat16")

  config.train = ml_collections.ConfigDict()
  config.train.steps = args.steps
  config.train.log_every = 10
  config.train.stop_after = -1
  config.train.compilation_cache_dir = "/tmp/jax_cache"  # Per-host persistent XLA cache.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 200
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  config.checkpoint.best_metric = ""
  config.checkpoint.best_mode = "min"
  return config

"""Shared config helpers: the `model` / `mesh` sections built from presets.

Imports only ml_collections and JAX-free klong_jax modules (configs must load on fleet hosts).
The one model preset table is `klong_jax.model.config`; the one arg-string parser is
`klong_jax.config_util.parse_arg` (re-exported here for the config files).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from klong_jax.config_util import parse_arg
from klong_jax.model import config as model_config_lib

__all__ = ["base_config", "curriculum_config", "mesh_config", "model_config", "optim_config",
           "parse_arg", "preset_config", "preset_name"]

# ModelConfig fields that are run-time switches, not shapes (a preset is matched on the rest).
SWITCHES = ("moe_impl", "moe_block_size", "moe_token_chunk", "capacity_factor", "lb_loss_coef",
            "z_loss_coef", "scan_layers", "remat_policy", "dtype", "param_dtype", "init_std")


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `model` section for a preset (all ModelConfig fields), with overrides applied."""
  if preset not in model_config_lib.preset_names():
    raise ValueError(f"unknown model preset {preset!r}; choose one of "
                     f"{sorted(model_config_lib.preset_names())}")
  fields = dataclasses.asdict(model_config_lib.get_preset(preset))
  return ml_collections.ConfigDict({**fields, **overrides})


def preset_name(model: Any) -> str:
  """The preset whose shape fields equal those of `model` (a `config.model` section)."""
  for name in model_config_lib.preset_names():
    fields = dataclasses.asdict(model_config_lib.get_preset(name))
    if all(model.get(k) == v for k, v in fields.items() if k not in SWITCHES):
      return name
  raise ValueError("model matches no preset in klong_jax/model/config.py; the server config is "
                   "built from a preset name")


def mesh_config(data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1,
                context: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` section: axis sizes; -1 fills the remaining devices. `context` > 1 shards each
  row's sequence over that many chips (context parallelism, parallel/rules.py `act_seq`)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor,
                                        context=context))


def base_config(preset: str, **mesh: int) -> ml_collections.ConfigDict:
  """A ConfigDict with `model` and `mesh` sections; experiment configs add the rest."""
  config = ml_collections.ConfigDict()
  config.model = model_config(preset)
  config.mesh = mesh_config(**mesh)
  config.seed = 0
  # Logical-axis rules ((logical name, mesh axis) pairs); empty = parallel/rules.LOGICAL_RULES.
  config.rules = ()
  return config


def preset_config(preset: str, arg: str | None, moe_chunk: int = 0, remat: str = "none",
                  **mesh: int) -> ml_collections.ConfigDict:
  """A model preset's ConfigDict with the run-time switches of its arg string applied:
  `scan=0|1`, `remat=none|full|save_dots|offload`, `dtype=bfloat16`, `moe_impl=auto|...`,
  `moe_chunk=N` (model.moe_token_chunk; default `moe_chunk`), `context=N` (mesh.context);
  `remat` is the preset's default (pod presets: "full", which launch/tpu.py's merge keeps)."""
  args = parse_arg(arg, scan=True, remat=remat, dtype="", moe_impl="auto", moe_chunk=moe_chunk,
                   context=mesh.pop("context", 1))
  config = base_config(preset, context=args.context, **mesh)
  config.model.moe_token_chunk = args.moe_chunk
  config.model.scan_layers = args.scan
  config.model.remat_policy = args.remat
  config.model.moe_impl = args.moe_impl
  if args.dtype:
    config.model.dtype = args.dtype
  return config


def glm45_air_pod_config(args: Any) -> ml_collections.ConfigDict:
  """GLM-4.5-Air on a TPU pod, the model + mesh shared by sft_glm45_air and rl_glm45_air: fsdp
  fills the slice, 128 experts over expert=8; `args.remat`, MoE in `args.moe_chunk`-token chunks
  (one chunk's working set), `args.context` chips per row's sequence. Seed 0, default rules."""
  config = preset_config(
      "glm45_air", f"remat={args.remat},moe_chunk={args.moe_chunk},context={args.context}",
      fsdp=-1, expert=8)
  config.seed = 0
  config.rules = ()                  # () = parallel/rules.LOGICAL_RULES (fsdp/expert/tensor).
  return config


def optim_config(model: Any, *, lr: float, warmup_steps: int, total_steps: int,
                 final_lr_ratio: float, weight_decay: float, compute_dtype: str
                 ) -> ml_collections.ConfigDict:
  """The `optim` section (AdamW + warmup/cosine, train/optim.py) shared by SFT and RL configs.

  compute_dtype "bfloat16": bf16 forward on fp32 master params. The MoE aux coefficients follow
  the model section; expert_bias_rate is the aux-loss-free router-bias step (0 = off).
  vocab_tiling: SFT/RL logprobs from the final hidden state in token x vocab tiles
  (kernels/vocab), never a [B, L, V] fp32 logits buffer.
  """
  return ml_collections.ConfigDict(dict(
      lr=lr,                          # Peak learning rate (AdamW).
      warmup_steps=warmup_steps,      # Linear warmup from 0 to lr.
      total_steps=total_steps,        # Optimizer updates (train.steps / grad_accum).
      final_lr_ratio=final_lr_ratio,  # Cosine decay ends at lr * final_lr_ratio.
      clip_norm=1.0,                  # Global gradient-norm clip.
      b1=0.9,                         # Adam beta1.
      b2=0.95,                        # Adam beta2.
      eps=1e-8,                       # Adam epsilon.
      weight_decay=weight_decay,      # Decoupled weight decay (AdamW).
      grad_accum=1,                   # Micro-batches summed per optimizer update.
      compute_dtype=compute_dtype,    # "bfloat16": bf16 forward on fp32 master params.
      lb_coef=model.get("lb_loss_coef", 1e-3),  # MoE load-balance loss weight (model section).
      z_coef=model.get("z_loss_coef", 1e-4),    # Router z-loss weight (model section).
      expert_bias_rate=1e-3,          # Aux-loss-free balancing of the router bias; 0 = off.
      vocab_tiling=True,              # Loss from hidden states by vocab tiles; False: logits.
      vocab_chunk_tokens=2048,        # Positions per tile (vocab_tiling).
      vocab_chunk_vocab=8192))        # Vocabulary columns per tile, about (vocab_tiling).


def curriculum_config(limits: str, stage_steps: int, name: str) -> ml_collections.ConfigDict:
  """The `curriculum` section from `limits=A:B:C`: one stage per rollout time limit (seconds),
  `stage_steps` steps each but the last (which runs to the end); one limit = RL at a fixed
  limit (the ablation's baseline)."""
  times = [float(x) for x in str(limits).split(":") if x.strip()]
  if not times:
    raise ValueError(f"{name}: limits={limits!r} must be colon-separated seconds, e.g. 20:40")
  stages = [dict(time_limit_s=t, steps=stage_steps) for t in times[:-1]]
  stages.append(dict(time_limit_s=times[-1]))
  # budget_clock: the clock of the stage limits, sent to the workers in control.json (wall |
  # tokens: agent/budget.py; "" = the workers' own --budget_clock).
  return ml_collections.ConfigDict(dict(window=4, stages=stages, budget_clock=""))



def rl_signal_config(rl: ml_collections.ConfigDict, *, groups_per_step: int,
                     updates_per_step: int) -> None:
  """Sets the coverage-and-signal fields of an `rl` section (issue #31; docs/architecture.md
  "Coverage and signal in RL"); each field's off value restores the earlier behaviour."""
  # dynamic_sampling (DAPO): a group whose members all score alike (advantage 0) leaves the batch
  # and the loss denominator, and more groups are read, up to dynamic_sampling_max_reads shards
  # per step, then the zero-variance groups read fill it. updates_per_step: exactly ppo_epochs x
  # this many optimizer updates per step, minibatches of whole trajectories (micro-batches of
  # data.batch_size / rl.minibatches rows summed); 0 = ceil(loss rows / minibatch rows) / epoch.
  max_reads = 2 * groups_per_step
  rl.update(dict(
      dynamic_sampling=True,          # Drop zero-variance groups (no signal), read more instead.
      dynamic_sampling_max_reads=max_reads,  # Shards read per step before zero-var. ones fill it.
      family_lookahead=8,             # Prefer, of the oldest N fresh shards, a new family; 0 off.
      length_cut="mask",              # Turns stopped at max_tokens: "mask" (no loss) or "train".
      updates_per_step=updates_per_step))  # Updates per step over whole trajectories; 0 = rows.

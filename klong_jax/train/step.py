"""The jitted SFT train step with explicit shardings, and the train state it updates.

We use `nnx.split`/`nnx.merge` + `jax.jit` (not `nnx.jit`): the state is a plain pytree
(`TrainState`) whose shardings come from the logical-axis rules, so in/out shardings, donation,
Orbax save/restore and AOT lowering all see the same tree. Params are fp32 masters; the forward
pass runs on a `compute_dtype` cast (bf16 option). Non-Param model state (e.g. MoE router bias
statistics) is carried in `rest` and updated by the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from klong_jax.kernels import vocab
from klong_jax.model import moe_router, sharded
from klong_jax.model.config import from_config_dict
from klong_jax.model.moe import ExpertBias
from klong_jax.train import losses, optim

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes: step count, fp32 params, optimizer and model state."""

  step: jax.Array
  params: nnx.State
  opt_state: Any
  rest: nnx.State


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest): trainable `nnx.Param`s apart from every other variable."""
  return nnx.split(model, nnx.Param, ...)


class TrainerParts(NamedTuple):
  """What every trainer (SFT, RL, policy export) builds first from its config."""

  model_cfg: Any
  graphdef: nnx.GraphDef
  params: nnx.State
  rest: nnx.State
  tx: optax.GradientTransformation
  shardings: TrainState


def build_trainer_parts(config: ml_collections.ConfigDict, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]]) -> TrainerParts:
  """The sharded model (config.model, seed config.seed) split into params / rest, the optimizer
  (config.optim) and the TrainState shardings."""
  model_cfg = from_config_dict(config.model)
  model = sharded.create_sharded_model(model_cfg, mesh, seed=config.seed, rules=rules)
  graphdef, params, rest = split_model(model)
  tx = optim.make_optimizer(config.optim)
  return TrainerParts(model_cfg, graphdef, params, rest, tx,
                      state_shardings(params, rest, tx, mesh, rules))


def state_shardings(params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> TrainState:
  """Shardings of the whole TrainState, from the params' logical axis names and `rules`.

  Optimizer-state leaves shaped like params take the param's sharding (`optax.tree_map_params`);
  counters and other leaves are replicated.
  """
  replicated = NamedSharding(mesh, P())
  with nnx.logical_axis_rules(rules):
    param_sh = nnx.get_named_sharding(params, mesh)
    rest_sh = nnx.get_named_sharding(rest, mesh)
  opt_shape = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt_shape, param_sh, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rest=rest_sh)


def init_state(params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation,
               shardings: TrainState) -> TrainState:
  """A step-0 TrainState laid out on `shardings` (optimizer state born sharded)."""
  def make(p, r):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rest=r)
  in_sh = (shardings.params, shardings.rest)
  return jax.jit(make, in_shardings=in_sh, out_shardings=shardings)(params, rest)


def update_expert_bias(rest: nnx.State, load: jax.Array, rate: float) -> nnx.State:
  """Aux-loss-free MoE balancing (DeepSeek-V3 / GLM): nudges every `ExpertBias` by the load.

  `load` is the model's `moe_expert_load` [num_moe_layers, E]; the stacked bias has that shape.
  """
  if not rate or load.size == 0:
    return rest
  def one(path, v):
    if not isinstance(v, ExpertBias):
      return v
    if v.shape != load.shape:
      raise ValueError(f"expert bias at {path} has shape {v.shape} but the expert load is "
                       f"{load.shape}; the model's aux 'moe_expert_load' must be per MoE layer")
    return v.replace(moe_router.update_expert_bias(v[...], jax.lax.stop_gradient(load), rate))
  return nnx.map_state(one, rest)


def sft_loss(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
             batch: Mapping[str, jax.Array], *, compute_dtype: Any, lb_coef: float,
             z_coef: float, vocab_loss: vocab.VocabLoss | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked CE (per loss token) + lb_coef * MoE load-balance + z_coef * router z-loss.

  With `vocab_loss` the CE comes from the final hidden state by vocab tiles (`kernels/vocab`),
  never materialising [B, L, V] fp32 logits; None uses the model's logits.
  """
  model = nnx.merge(graphdef, optim.cast_for_compute(params, compute_dtype), rest)
  args = (batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  if vocab_loss is None:
    logits, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    ce, m = losses.cross_entropy(logits, *args)
  else:
    hidden, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                        return_hidden=True)
    ce, m = losses.cross_entropy_from_hidden(hidden, model.head(), *args, vocab_loss=vocab_loss)
  lb = jnp.asarray(aux.get("moe_lb_loss", 0.0), jnp.float32)
  z = jnp.asarray(aux.get("router_z_loss", 0.0), jnp.float32)
  loss = ce + lb_coef * lb + z_coef * z
  metrics = {"loss": loss, "ce": ce, "moe_lb_loss": lb, "router_z_loss": z,
             "moe_drop_rate": jnp.asarray(aux.get("moe_drop_rate", 0.0), jnp.float32),
             "loss_tokens": m["loss_tokens"],
             "tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
             "moe_expert_load": aux.get("moe_expert_load", jnp.zeros((0, 0), jnp.float32))}
  return loss, metrics


def make_sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  cfg: ml_collections.ConfigDict, shardings: TrainState,
                  batch_sharding: NamedSharding, rules: Sequence[tuple[str, Any]]
                  ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

  `cfg` is the `optim` section (compute_dtype, lb_coef, z_coef, expert_bias_rate, vocab_tiling,
  vocab_chunk_tokens, vocab_chunk_vocab). The batch is the four `BATCH_KEYS` arrays [B, L];
  metrics are replicated scalars.
  """
  compute_dtype = optim.resolve_dtype(cfg.compute_dtype)
  vocab_loss = vocab.VocabLoss.from_config(cfg)
  lb_coef, z_coef = float(cfg.lb_coef), float(cfg.z_coef)
  bias_rate = float(cfg.expert_bias_rate)

  def step(state: TrainState, batch: Mapping[str, jax.Array]):
    grad_fn = jax.value_and_grad(sft_loss, argnums=1, has_aux=True)
    (_, metrics), grads = grad_fn(
        graphdef, state.params, state.rest, batch, compute_dtype=compute_dtype,
        lb_coef=lb_coef, z_coef=z_coef, vocab_loss=vocab_loss)
    load = metrics.pop("moe_expert_load")
    new_rest = update_expert_bias(state.rest, load, bias_rate)
    if load.size:
      # Max/mean routed load over experts (1 = balanced), averaged over MoE layers.
      metrics["moe_load_imbalance"] = jnp.mean(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rest=new_rest)
    return new_state, metrics

  mesh = batch_sharding.mesh
  replicated = NamedSharding(mesh, P())
  batch_sh = {k: batch_sharding for k in BATCH_KEYS}
  jitted = jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  def run(state: TrainState, batch: Mapping[str, Any]):
    # The model's sharding constraints and expert shard_map read the mesh and rules at trace time.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return jitted(state, {k: batch[k] for k in BATCH_KEYS})
  run.jitted = jitted  # for AOT lowering / cost analysis
  return run

"""The jitted RL train step: PPO-style clipped surrogate vs the sampler + KL to a reference policy.

Same TrainState, shardings, optimizer and MoE bias update as the SFT step (train/step.py); the
loss is `rl.losses.ppo_loss` on packed rows that carry the behaviour logprobs and the rollout
advantages. The reference policy (params at the start of the current curriculum stage) is a
separate, non-donated params tree with the params' shardings; its forward runs only if kl_coef > 0.
`update_plan` cuts one element into PPO epochs x minibatches optimizer updates (verl's
`ppo_epochs` / mini-batches): more policy movement per rollout, with the clip bounding it.
With `rl.routing_replay` (R3, default on) the batch also carries `routing`, the sampler's MoE
expert ids per token: the policy and reference forwards replay that selection (gate weights
still from the trainer's router), so a token is trained under the experts that sampled it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from klong_jax.kernels import vocab
from klong_jax.rl import losses as rl_losses
from klong_jax.train import losses, optim
from klong_jax.train import step as step_lib

RL_BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "logprobs", "advantages")


def routing_replay(rl: ml_collections.ConfigDict) -> bool:
  """Whether the RL trainer replays the sampler's expert selection (R3); on unless disabled."""
  return bool(rl.get("routing_replay", True))


def off_policy(rl: ml_collections.ConfigDict) -> str:
  """The off-policy correction: "none" (ratio vs the sampler) or "decoupled" (rl/losses.py)."""
  mode = str(rl.get("off_policy", "none"))
  if mode not in ("none", "decoupled"):
    raise ValueError(f"rl.off_policy must be 'none' or 'decoupled', got {mode!r}")
  return mode


def batch_keys(rl: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch arrays the RL step reads: RL_BATCH_KEYS (+ "routing" with routing replay,
  + "prox_logp" with the decoupled off-policy loss)."""
  return (RL_BATCH_KEYS + (("routing",) if routing_replay(rl) else ()) +
          (("prox_logp",) if off_policy(rl) == "decoupled" else ()))


def _temperature(rl: ml_collections.ConfigDict) -> float:
  temperature = float(rl.get("temperature", 1.0))
  if temperature <= 0:
    raise ValueError(f"rl.temperature must be > 0 (the workers' sampling temperature), got "
                     f"{temperature}")
  return temperature


def policy_logprobs(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                    batch: Mapping[str, jax.Array], *, compute_dtype: Any,
                    rl: ml_collections.ConfigDict, vocab_loss: vocab.VocabLoss | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Tempered log-probs [B, L] of each next token (logits positions) under `params`, and the
  model's aux. Behaviour logprobs are log softmax(logits / T) under the sampling temperature T
  (inference/sampling.py "tempered"): policy, proximal and reference policies use the same T.
  With `vocab_loss` they come from the final hidden state by vocab tiles (`kernels/vocab`: no
  [B, L, V] fp32 logits); None uses the model's logits."""
  temperature = _temperature(rl)
  model = nnx.merge(graphdef, optim.cast_for_compute(params, compute_dtype), rest)
  routing = batch.get("routing") if routing_replay(rl) else None
  inputs = (batch["tokens"], batch["positions"], batch["segment_ids"], routing)
  targets, _ = losses.shift_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  if vocab_loss is None:
    logits, aux = model(*inputs)
    return losses.token_logprobs(logits.astype(jnp.float32) / temperature, targets), aux
  hidden, aux = model(*inputs, return_hidden=True)
  head, layout = model.head()
  return vocab.token_logprobs_from_hidden(hidden, head, targets, head_layout=layout,
                                          temperature=temperature, vocab_loss=vocab_loss), aux


def rl_loss(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, ref_params: nnx.State,
            batch: Mapping[str, jax.Array], *, compute_dtype: Any,
            rl: ml_collections.ConfigDict, lb_coef: float, z_coef: float,
            vocab_loss: vocab.VocabLoss | None = None, denominator: jax.Array | None = None,
            aux_scale: jax.Array | float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped loss (+ kl_coef * KL to `ref_params`) + MoE load-balance and z losses.

  As one micro-batch of a larger update (`make_rl_accum_step`): the PPO term is divided by the
  update's `denominator` and the MoE terms scaled by `aux_scale` (1 / micro-batches), so the
  micro-batch losses sum to the update's loss.

  Log-probs by `policy_logprobs` (tiled over the vocab with `vocab_loss`). With
  rl.off_policy="decoupled" the batch carries `prox_logp` (logits positions, from
  `make_logprob_fn` on the params at the start of the step) and the loss is decoupled PPO."""
  routing = batch.get("routing") if routing_replay(rl) else None
  logp, aux = policy_logprobs(graphdef, params, rest, batch, compute_dtype=compute_dtype, rl=rl,
                              vocab_loss=vocab_loss)
  _, weights = losses.shift_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  kl_coef = float(rl.get("kl_coef", 0.0))
  ref_logp = None
  if kl_coef:
    ref_logp, _ = policy_logprobs(graphdef, jax.lax.stop_gradient(ref_params), rest, batch,
                                  compute_dtype=compute_dtype, rl=rl, vocab_loss=vocab_loss)
    ref_logp = jax.lax.stop_gradient(ref_logp)
  decoupled = off_policy(rl) == "decoupled"
  if decoupled and "prox_logp" not in batch:
    raise ValueError("rl.off_policy='decoupled' needs batch['prox_logp'] (rl/step.py "
                     "make_logprob_fn on the step's starting params)")
  ratio_cap = float(rl.get("ratio_cap", 0.0)) or None
  pg, m = rl_losses.ppo_loss(
      logp, losses.shift_aligned(batch["logprobs"]), losses.shift_aligned(batch["advantages"]),
      weights, batch["segment_ids"], ref_logp=ref_logp, clip_low=float(rl.clip_low),
      clip_high=float(rl.clip_high), kl_coef=kl_coef, kl_estimator=rl.get("kl_estimator", "k3"),
      kl_clamp=float(rl.get("kl_clamp", 0.0)) or None, ratio_cap=ratio_cap,
      normalization=rl.get("normalization", "token"),
      prox_logp=batch["prox_logp"] if decoupled else None,
      is_level=rl.get("is_level", "token"), is_mode=rl.get("is_mode", "truncate"),
      is_cap=float(rl.get("is_cap", 2.0)), denominator=denominator)
  lb = jnp.asarray(aux.get("moe_lb_loss", 0.0), jnp.float32)
  z = jnp.asarray(aux.get("router_z_loss", 0.0), jnp.float32)
  loss = pg + aux_scale * (lb_coef * lb + z_coef * z)
  m = dict(m, loss=loss, pg_loss=pg, moe_lb_loss=lb, router_z_loss=z,
           moe_drop_rate=jnp.asarray(aux.get("moe_drop_rate", 0.0), jnp.float32),
           tokens=(batch["segment_ids"] > 0).sum().astype(jnp.float32),
           moe_expert_load=aux.get("moe_expert_load", jnp.zeros((0, 0), jnp.float32)))
  m.setdefault("kl", jnp.zeros((), jnp.float32))
  if routing is not None:  # Share of real tokens whose selection was replayed in every layer.
    real = batch["segment_ids"] > 0
    recorded = jnp.all(routing >= 0, axis=(2, 3)) & real
    m["routing_replayed"] = recorded.sum() / jnp.maximum(real.sum(), 1)
    # Share of recorded (token, MoE layer) selections this trainer would have routed elsewhere:
    # the drift replay removes (mean over layers).
    m["routing_flip"] = jnp.asarray(aux["moe_replay_flip"], jnp.float32)
  return loss, m


def make_rl_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                 optim_cfg: ml_collections.ConfigDict, rl_cfg: ml_collections.ConfigDict,
                 shardings: step_lib.TrainState, batch_sharding: NamedSharding,
                 rules: Sequence[tuple[str, Any]]
                 ) -> Callable[[step_lib.TrainState, nnx.State, Mapping[str, Any]],
                               tuple[step_lib.TrainState, dict[str, jax.Array]]]:
  """Returns the jitted `step(state, ref_params, batch) -> (state, metrics)`; state is donated."""
  compute_dtype = optim.resolve_dtype(optim_cfg.get("compute_dtype", "float32"))
  lb_coef, z_coef = float(optim_cfg.get("lb_coef", 0.0)), float(optim_cfg.get("z_coef", 0.0))
  bias_rate = float(optim_cfg.get("expert_bias_rate", 0.0))
  vocab_loss = vocab.VocabLoss.from_config(optim_cfg)

  def step(state: step_lib.TrainState, ref_params: nnx.State, batch: Mapping[str, jax.Array]):
    grad_fn = jax.value_and_grad(rl_loss, argnums=1, has_aux=True)
    (_, metrics), grads = grad_fn(graphdef, state.params, state.rest, ref_params, batch,
                                  compute_dtype=compute_dtype, rl=rl_cfg, lb_coef=lb_coef,
                                  z_coef=z_coef, vocab_loss=vocab_loss)
    load = metrics.pop("moe_expert_load")
    new_rest = step_lib.update_expert_bias(state.rest, load, bias_rate)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rest=new_rest), metrics

  mesh = batch_sharding.mesh
  keys = batch_keys(rl_cfg)
  # One sharding for every batch array (a pytree prefix): a batch without `routing` (replay
  # on, but data without records) still fits, and the model then routes by its own top-k.
  jitted = jax.jit(step, in_shardings=(shardings, shardings.params, batch_sharding),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

  def run(state: step_lib.TrainState, ref_params: nnx.State, batch: Mapping[str, Any]):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return jitted(state, ref_params, {k: batch[k] for k in keys if k in batch})
  run.jitted = jitted
  return run


class AccumStep(NamedTuple):
  """The jitted pieces of one optimizer update over several micro-batches (rl/minibatch.py):
  `grad(state, ref, batch, denominator, aux_scale) -> (grads, metrics)`, `add(a, b)` (a is
  donated) and `apply(state, grads, load) -> (state, grad_norm)` (state donated)."""

  grad: Callable[..., tuple[nnx.State, dict[str, jax.Array]]]
  add: Callable[[nnx.State, nnx.State], nnx.State]
  apply: Callable[..., tuple[step_lib.TrainState, jax.Array]]


def make_rl_accum_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       optim_cfg: ml_collections.ConfigDict, rl_cfg: ml_collections.ConfigDict,
                       shardings: step_lib.TrainState, batch_sharding: NamedSharding,
                       rules: Sequence[tuple[str, Any]]) -> AccumStep:
  """`make_rl_step` cut in three, so one optimizer update can sum the gradients of any number of
  micro-batches (each normalised by the whole update's denominator): what a minibatch formed by
  trajectories needs, whose chunks fill a varying number of fixed-shape micro-batches."""
  compute_dtype = optim.resolve_dtype(optim_cfg.get("compute_dtype", "float32"))
  lb_coef, z_coef = float(optim_cfg.get("lb_coef", 0.0)), float(optim_cfg.get("z_coef", 0.0))
  bias_rate = float(optim_cfg.get("expert_bias_rate", 0.0))
  vocab_loss = vocab.VocabLoss.from_config(optim_cfg)
  mesh = batch_sharding.mesh
  repl = NamedSharding(mesh, P())
  keys = batch_keys(rl_cfg)

  def grad(params, rest, ref_params, batch, denominator, aux_scale):
    grad_fn = jax.value_and_grad(rl_loss, argnums=1, has_aux=True)
    (_, metrics), grads = grad_fn(graphdef, params, rest, ref_params, batch,
                                  compute_dtype=compute_dtype, rl=rl_cfg, lb_coef=lb_coef,
                                  z_coef=z_coef, vocab_loss=vocab_loss, denominator=denominator,
                                  aux_scale=aux_scale)
    return grads, metrics

  def apply(state: step_lib.TrainState, grads: nnx.State, load: jax.Array):
    new_rest = step_lib.update_expert_bias(state.rest, load, bias_rate)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rest=new_rest), optax.global_norm(grads)

  grad_j = jax.jit(grad, in_shardings=(shardings.params, shardings.rest, shardings.params,
                                       batch_sharding, repl, repl),
                   out_shardings=(shardings.params, repl))
  add_j = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b),
                  in_shardings=(shardings.params, shardings.params),
                  out_shardings=shardings.params, donate_argnums=(0,))
  apply_j = jax.jit(apply, in_shardings=(shardings, shardings.params, repl),
                    out_shardings=(shardings, repl), donate_argnums=(0,))

  def run_grad(state, ref_params, batch, denominator, aux_scale):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return grad_j(state.params, state.rest, ref_params,
                    {k: batch[k] for k in keys if k in batch},
                    jnp.float32(denominator), jnp.float32(aux_scale))

  def run_add(a, b):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return add_j(a, b)

  def run_apply(state, grads, load):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return apply_j(state, grads, load)
  return AccumStep(run_grad, run_add, run_apply)


def merge_micro_metrics(ms: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """One update's metrics from its micro-batches': the losses (each already divided by the
  update's denominator) and token counts summed, the rest averaged, `*_max` the max and
  `is/raw_min` the min."""
  out = {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}
  for k in ("loss", "pg_loss", "tokens", "loss_tokens"):
    if k in ms[0]:
      out[k] = float(sum(float(m[k]) for m in ms))
  for k in ("kl_max", "logprob_gap_max", "is/weight_max", "is/raw_max"):
    if k in ms[0]:
      out[k] = max(float(m[k]) for m in ms)
  if "is/raw_min" in ms[0]:
    out["is/raw_min"] = min(float(m["is/raw_min"]) for m in ms)
  return out


def make_logprob_fn(graphdef: nnx.GraphDef, optim_cfg: ml_collections.ConfigDict,
                    rl_cfg: ml_collections.ConfigDict, shardings: step_lib.TrainState,
                    batch_sharding: NamedSharding, rules: Sequence[tuple[str, Any]]
                    ) -> Callable[[step_lib.TrainState, Mapping[str, Any]], jax.Array]:
  """Returns the jitted `logp(state, batch) -> [B, L]` tempered log-probs of the state's params
  (logits positions): the proximal policy of decoupled PPO, computed once per element before its
  updates. No gradient, nothing donated."""
  compute_dtype = optim.resolve_dtype(optim_cfg.get("compute_dtype", "float32"))
  vocab_loss = vocab.VocabLoss.from_config(optim_cfg)

  def fn(params: nnx.State, rest: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
    return policy_logprobs(graphdef, params, rest, batch, compute_dtype=compute_dtype,
                           rl=rl_cfg, vocab_loss=vocab_loss)[0]

  jitted = jax.jit(fn, in_shardings=(shardings.params, shardings.rest, batch_sharding),
                   out_shardings=batch_sharding)
  keys = ("tokens", "positions", "segment_ids", "loss_mask", "routing")

  def run(state: step_lib.TrainState, batch: Mapping[str, Any]) -> jax.Array:
    with jax.set_mesh(batch_sharding.mesh), nnx.logical_axis_rules(rules):
      return jitted(state.params, state.rest, {k: batch[k] for k in keys if k in batch})
  return run


def staleness_metrics(policy_version: np.ndarray, loss_mask: np.ndarray, version: int
                      ) -> dict[str, float]:
  """Per-token policy lag (trainer version - the version that sampled the token) over the loss
  tokens of an element: mean, max and a histogram (shares lagging 0, 1, 2-3, 4-7, 8+ versions)."""
  pv = np.asarray(policy_version)
  live = (np.asarray(loss_mask) > 0) & (pv >= 0)
  if not live.any():
    return {}
  lag = version - pv[live]
  out = {"stale/mean": float(lag.mean()), "stale/max": float(lag.max())}
  for name, lo, hi in (("0", 0, 0), ("1", 1, 1), ("2-3", 2, 3), ("4-7", 4, 7),
                       ("8+", 8, np.inf)):
    out[f"stale/share_{name}"] = float(((lag >= lo) & (lag <= hi)).mean())
  return out


def copy_params(params: nnx.State, shardings: nnx.State) -> nnx.State:
  """A fresh copy of `params` on the same shardings (the reference policy; safe from donation)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), in_shardings=(shardings,),
                 out_shardings=shardings)(params)


def minibatch_rows(rl_cfg: ml_collections.ConfigDict, rows: int, data_parallel: int) -> int:
  """Rows per optimizer update (data.batch_size / rl.minibatches), checked: every minibatch must
  split evenly over the data-parallel devices (raises ValueError naming the fields to change)."""
  epochs, mbs = int(rl_cfg.get("ppo_epochs", 1)), int(rl_cfg.get("minibatches", 1))
  if epochs < 1 or mbs < 1:
    raise ValueError(f"rl.ppo_epochs ({epochs}) and rl.minibatches ({mbs}) must be >= 1")
  if rows % mbs or (rows // mbs) % data_parallel:
    raise ValueError(f"data.batch_size ({rows}) must split into rl.minibatches ({mbs}) equal "
                     f"minibatches whose rows divide over the {data_parallel} data-parallel "
                     "devices; change rl.minibatches or data.batch_size")
  return rows // mbs


def _loss_rows(loss_mask: np.ndarray) -> np.ndarray:
  """bool [rows]: which packed rows carry at least one loss token."""
  mask = np.asarray(loss_mask)
  return mask.reshape(mask.shape[0], -1).any(axis=1)


def num_minibatches(loss_mask: np.ndarray, mb_rows: int) -> int:
  """Minibatches one epoch over an element needs: ceil(rows with loss tokens / mb_rows), >= 1."""
  return max(1, -(-int(_loss_rows(loss_mask).sum()) // mb_rows))


def update_plan(loss_mask: np.ndarray, *, mb_rows: int, epochs: int, seed: int, step: int,
                minibatches: int | None = None) -> list[np.ndarray]:
  """Row indices of each optimizer update for one element ([rows, L] loss mask, rows a multiple
  of `mb_rows`: the element's packed batches concatenated).

  Each epoch shuffles the rows that carry loss tokens (seeded by (seed, step, epoch), so a
  resumed run replays the same updates), deals them round-robin into `minibatches` updates
  (default `num_minibatches`; multi-host callers pass the max over hosts) and fills each to
  `mb_rows` with padding rows. An element whose chunks overflow one batch is thus trained in
  evenly filled updates, never in a near-empty one (whose full-size Adam step would be mostly
  noise); one minibatch of one batch is the rows in order (a plain PPO step).
  """
  rows = loss_mask.shape[0]
  if rows % mb_rows:
    raise ValueError(f"element rows ({rows}) must be a multiple of the minibatch rows ({mb_rows})")
  has_loss = _loss_rows(loss_mask)
  real, pad = np.flatnonzero(has_loss), np.flatnonzero(~has_loss)
  n = minibatches or num_minibatches(loss_mask, mb_rows)
  if n * mb_rows > rows:
    raise ValueError(f"{n} minibatches of {mb_rows} rows need more than the element's {rows} rows")
  plan = []
  for epoch in range(epochs):
    perm = real[np.random.default_rng([seed, step, epoch]).permutation(real.size)]
    fill = iter(pad)
    for j in range(n):
      part = list(perm[j::n])
      part += [next(fill) for _ in range(mb_rows - len(part))]
      plan.append(np.sort(np.asarray(part, np.int64)))
  return plan


def combine_update_metrics(ms: Sequence[Mapping[str, Any]], epochs: int = 1) -> dict[str, Any]:
  """One metrics row for an element trained in several updates: processed `tokens` summed, loss
  tokens counted once per epoch pass, `*_max` the max (`is/raw_min` the min), everything else
  averaged; `ppo/*` keeps the first update (on-policy: ratio ~1, so its logprob gap is the
  sampler-vs-trainer mismatch + staleness) and the last (how far the epochs moved the policy)."""
  if not ms:  # an element with no loss tokens (e.g. every turn cut at max_tokens and masked)
    return {"tokens": 0.0, "loss_tokens": 0.0, "ppo/updates": 0.0}
  if len(ms) == 1:
    return dict(ms[0])
  out = {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}
  out["tokens"] = float(sum(float(m["tokens"]) for m in ms))
  out["loss_tokens"] = float(sum(float(m["loss_tokens"]) for m in ms)) / epochs
  out["ppo/updates"] = float(len(ms))
  for k in ("kl_max", "logprob_gap_max", "is/weight_max", "is/raw_max"):
    if k in ms[0]:
      out[k] = max(float(m[k]) for m in ms)
  if "is/raw_min" in ms[0]:
    out["is/raw_min"] = min(float(m["is/raw_min"]) for m in ms)
  for k in ("ratio_mean", "clip_frac", "kl", "logprob_gap_mean"):
    if k not in ms[0]:
      continue
    out[f"ppo/{k}_first"], out[f"ppo/{k}_last"] = float(ms[0][k]), float(ms[-1][k])
  return out

"""MoE block: router + routed experts (dropless or capacity; expert-parallel) + shared expert.

Expert parallelism: experts are sharded over the mesh axis that the logical name `expert` maps
to, and tokens (batch) over `act_batch` (data, fsdp, expert). Two dispatches (`moe_dispatch`
config field), both exactly dropless with static shapes and tested equal:
- "allgather" (the reference): inside a `shard_map`, each device all-gathers the token shards of
  its expert group, runs the copies routed to *its* experts through the local compute
  (`moe_dispatch`), and a reduce-scatter (`psum_scatter`) over the expert axis returns each
  token's summed output to its owner. Activations cross the expert axis at full size, twice.
- "a2a" (`moe_a2a`): each device sends only its token copies to their experts' devices and gets
  the outputs back (`ragged_all_to_all` on TPU/GPU, worst-case padded `all_to_all` on CPU).
- "auto": a2a where tokens and experts share mesh axes and the compute is dropless.
Both psum over the tensor axis that shards the expert hidden dim. The router (and its aux losses,
over real tokens only: `segment_ids > 0`) runs outside the shard_map on globally sharded arrays.

`moe_impl="capacity"` swaps the dropless local compute for the fixed-capacity token-dropping one
(`moe_dispatch.capacity_ffn`). Capacity is per dispatch group, GShard-style: the tokens one device
sees after the all-gather (all tokens without a mesh, or when tokens are sharded only over the
expert axes; one data/fsdp shard's tokens otherwise), with C = ceil(factor * group * k / E).
Dropped copies are counted per device and summed over the expert and token axes into a global
drop rate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.model import moe_a2a, moe_chunk, moe_dispatch, moe_router
from klong_jax.model.config import ModelConfig
from klong_jax.model.layers import MLP, constrain, dtype_of, mesh_axes, param


class ExpertBias(nnx.Variable):
  """GLM `e_score_correction_bias`: selection-only bias, updated outside the gradient."""


def _axes_spec(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes_size(axes: tuple[str, ...]) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def _expert_compute(impl: str, x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array,
                    wu: jax.Array, wd: jax.Array, offset: jax.Array | int, block_size: int,
                    capacity_factor: float, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """One device's expert output and its dropped-copy count (0 on the dropless paths)."""
  if impl == "capacity":
    capacity = moe_dispatch.expert_capacity(x.shape[0], idx.shape[1], num_experts,
                                            capacity_factor)
    return moe_dispatch.capacity_ffn(x, idx, w, wg, wu, wd, offset, capacity=capacity)
  y = moe_dispatch.local_experts(impl, x, idx, w, wg, wu, wd, offset, block_size)
  return y, jnp.zeros((), jnp.float32)


def resolve_dispatch(dispatch: str, impl: str, exchange_axes: tuple[str, ...]) -> str:
  """"auto": all-to-all when tokens and experts share mesh axes and the compute is dropless,
  else the all-gather path (capacity is defined per all-gather group; nothing to exchange)."""
  if dispatch == "auto":
    return "a2a" if exchange_axes and impl != "capacity" else "allgather"
  if dispatch == "a2a" and impl == "capacity":
    raise ValueError("moe_dispatch='a2a' has no token-dropping path; use moe_impl other than "
                     "'capacity' or moe_dispatch='allgather'")
  return dispatch


def routed_experts(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                   wd: jax.Array, impl: str = "auto", block_size: int = 64,
                   capacity_factor: float = 1.25, dispatch: str = "allgather",
                   mask: jax.Array | None = None, exchange: str = "auto",
                   ragged_fn: object = None) -> tuple[jax.Array, jax.Array]:
  """Routed-expert output [N,D] for tokens x [N,D] and the fraction of the real tokens' routed
  copies dropped (0 except for impl "capacity").

  Expert-parallel under a mesh, by `dispatch` ("allgather" | "a2a" | "auto", module doc and
  `moe_a2a`). `mask` [N] bool marks real tokens: with impl "capacity" padding tokens take no
  expert slots (their routed output is 0) and are not counted.
  """
  mesh = jax.sharding.get_abstract_mesh()
  num_experts, k = wg.shape[0], idx.shape[1]
  if mask is None:
    mask = jnp.ones(idx.shape[:1], bool)
  total = jnp.maximum(jnp.sum(mask) * k, 1).astype(jnp.float32)
  if impl == "capacity":
    idx = jnp.where(mask[:, None], idx, -1)  # Ids in no expert's range: not dispatched.
  if mesh.empty:
    y, dropped = _expert_compute(impl, x, idx, w, wg, wu, wd, 0, block_size, capacity_factor,
                                 num_experts)
    return y, dropped / total
  exp_axes = mesh_axes("expert")
  mlp_axes = mesh_axes("expert_mlp")
  # Tokens [N] = rows x sequence flattened: sharded over the batch axes, then (context
  # parallelism) the sequence axes.
  tok_axes = mesh_axes("act_batch") + mesh_axes("act_seq")
  n = x.shape[0]
  if num_experts % _axes_size(exp_axes):
    raise ValueError(f"num_experts={num_experts} is not divisible by the expert mesh axes "
                     f"{exp_axes} (size {_axes_size(exp_axes)}); change mesh.expert")
  if n % _axes_size(tok_axes):
    tok_axes = ()  # Too few tokens to shard (e.g. batch-1 decode): replicate them.
  gather = tuple(a for a in exp_axes if a in tok_axes)
  dispatch = resolve_dispatch(dispatch, impl, gather)
  num_local = num_experts // _axes_size(exp_axes)
  tok = jax.sharding.PartitionSpec(_axes_spec(tok_axes))
  w_in = jax.sharding.PartitionSpec(_axes_spec(exp_axes), None, _axes_spec(mlp_axes))
  w_out = jax.sharding.PartitionSpec(_axes_spec(exp_axes), _axes_spec(mlp_axes), None)

  def local(x, idx, w, wg, wu, wd):
    rest = tuple(a for a in exp_axes if a not in gather)
    dropped = jnp.zeros((), jnp.float32)
    if dispatch == "a2a" and gather:
      y = moe_a2a.a2a_experts(x, idx, w, wg, wu, wd, exp_axes=exp_axes, gather=gather,
                              impl=impl, block_size=block_size, exchange=exchange,
                              ragged_fn=ragged_fn)
      gather_back = ()
    else:
      gather_back = tuple(a for a in tok_axes if a in exp_axes)  # The token order of x's spec.
      if gather_back:
        x, idx, w = (jax.lax.all_gather(a, gather_back, axis=0, tiled=True) for a in (x, idx, w))
      offset = 0
      for axis in exp_axes:  # Row-major index of this device's expert shard.
        offset = offset * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
      y, dropped = _expert_compute(impl, x, idx, w, wg, wu, wd, offset * num_local, block_size,
                                   capacity_factor, num_experts)
    # Each device counted its experts' drops in its token group: sum over experts and groups.
    count_axes = exp_axes + tuple(a for a in tok_axes if a not in exp_axes)
    if count_axes:
      dropped = jax.lax.psum(dropped, count_axes)
    if mlp_axes:
      y = jax.lax.psum(y, mlp_axes)
    if rest:
      y = jax.lax.psum(y, rest)
    if gather_back:
      y = jax.lax.psum_scatter(y, gather_back, scatter_dimension=0, tiled=True)
    return y, dropped

  y, dropped = jax.shard_map(local, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                             out_specs=(tok, jax.sharding.PartitionSpec()),
                             check_vma=False)(x, idx, w, wg, wu, wd)
  return y, dropped / total


class MoE(nnx.Module):
  """Router + routed experts (HF `mlp.gate`, `mlp.experts.*`) + shared experts MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.cfg = cfg
    self.dtype = dtype_of(cfg.dtype)
    self.router_de = param(rngs, (d, e), ("embed", None), cfg)
    if cfg.router_bias:
      self.expert_bias_e = ExpertBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                        eager_sharding=False)
    self.gate_edf = param(rngs, (e, d, f), ("expert", "expert_embed", "expert_mlp"), cfg)
    self.up_edf = param(rngs, (e, d, f), ("expert", "expert_embed", "expert_mlp"), cfg)
    self.down_efd = param(rngs, (e, f, d), ("expert", "expert_mlp", "expert_embed"), cfg)
    if cfg.num_shared_experts:
      self.shared = MLP(cfg, f * cfg.num_shared_experts, rngs=rngs)

  def route(self, x: jax.Array, replay: jax.Array | None = None, mask: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Router on flat tokens [N,D] -> (idx [N,k], weights [N,k], aux losses + load).

    `mask` [N] bool: the real tokens; the aux statistics count only them (None: all tokens).

    `replay` [N,k] (routing replay): recorded expert ids that replace the top-k selection on
    tokens that have them (-1 rows: own top-k); the gate weights are still this router's scores.
    aux "moe_replay_flip": share of recorded tokens whose own top-k set differs (0 without replay).
    """
    cfg = self.cfg
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32),
                        self.router_de[...].astype(jnp.float32))
    scores = moe_router.router_scores(logits, cfg.router_score)
    bias = self.expert_bias_e[...] if cfg.router_bias else None
    idx, w = moe_router.select_experts(scores, bias, cfg.num_experts_per_tok,
                                       cfg.norm_topk_prob, cfg.routed_scaling_factor)
    flip = jnp.zeros((), jnp.float32)
    if replay is not None:
      flip = moe_router.replay_flip_share(idx, replay, cfg.num_experts, mask)
      idx = moe_router.replay_experts(idx, replay, cfg.num_experts)
      w = moe_router.gate_weights(scores, idx, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    aux = {"moe_replay_flip": flip,
           "moe_lb_loss": moe_router.load_balancing_loss(scores, idx, mask),
           "router_z_loss": moe_router.router_z_loss(logits, mask),
           "moe_expert_load": moe_router.expert_load(idx, cfg.num_experts, mask)}
    return idx, w, aux

  def __call__(self, x: jax.Array, replay: jax.Array | None = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B,T,D] (+ optional recorded ids [B,T,k], real-token mask [B,T]) -> (y, aux);
    aux "moe_routing" = ids used; the statistics and drop rate count only masked-in tokens."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    k = self.cfg.num_experts_per_tok
    flat_mask = None if mask is None else mask.reshape(b * t).astype(bool)
    idx, w, aux = self.route(flat, None if replay is None else replay.reshape(b * t, k), flat_mask)
    aux["moe_routing"] = idx.reshape(b, t, k)
    dt = self.dtype
    cfg = self.cfg
    weights = (self.gate_edf[...].astype(dt), self.up_edf[...].astype(dt),
               self.down_efd[...].astype(dt))

    def routed(x, idx, w, mask):
      return routed_experts(x, idx, w, *weights, cfg.moe_impl, cfg.moe_block_size,
                            cfg.capacity_factor, cfg.moe_dispatch, mask)

    if cfg.moe_token_chunk and cfg.moe_token_chunk < t:
      # Dropless only (config check): the routed output is per token, the drop rate 0.
      real = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
      y = moe_chunk.chunked_routed(routed, cfg.moe_token_chunk, x, idx.reshape(b, t, k),
                                   w.reshape(b, t, k), real)
      aux["moe_drop_rate"] = jnp.zeros((), jnp.float32)
    else:
      y, aux["moe_drop_rate"] = routed(flat, idx, w, flat_mask)
      y = y.reshape(b, t, d)
    if self.cfg.num_shared_experts:
      y = y + self.shared(x)
    return constrain(y, ("act_batch", "act_seq", "act_embed")), aux

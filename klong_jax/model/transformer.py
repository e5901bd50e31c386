"""The decoder: embed -> dense block(s) -> MoE blocks (stacked, scanned) -> norm -> logits.

Layers of one kind are stored *stacked* (leading `layers` axis, built with `nnx.vmap`), whether
they run under `jax.lax.scan` (`scan_layers=True`) or in a Python loop over slices (False); so
both modes share one parameter layout and give the same outputs. The first `first_k_dense`
layers (dense FFN) always run unrolled, outside the scan. Generation lives in `inference/`; the
model only offers `init_cache` and `decode` (one forward that also writes the KV cache).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from klong_jax.model.attention import Attention
from klong_jax.model.config import ModelConfig
from klong_jax.model.layers import MLP, Embedder, RMSNorm, constrain
from klong_jax.model.moe import MoE

AUX_SCALARS = ("moe_lb_loss", "router_z_loss", "moe_drop_rate", "moe_replay_flip")


@struct.dataclass
class KVCache:
  """Per-layer keys/values, k and v [num_layers, B, max_len, num_kv_heads, head_dim]."""

  k: jax.Array
  v: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


class Block(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)); x + ffn(norm(x)); ffn is MLP or MoE."""

  def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
    self.is_moe = moe
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def _ffn(self, x: jax.Array, replay: jax.Array | None = None, mask: jax.Array | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      y, aux = self.mlp(h, replay, mask)
    else:
      y, aux = self.mlp(h), {}
    return constrain(x + y, ("act_batch", "act_seq", "act_embed")), aux

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               replay: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = x + self.attn(self.input_layernorm(x), positions, segment_ids)
    # MoE statistics count real tokens only (segment id 0 = padding).
    return self._ffn(x, replay, None if segment_ids is None else segment_ids > 0)

  def decode(self, x: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array,
             layer: jax.Array | int
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One cached step on the whole stacked cache k/v [num_layers, B, S, K, H], this block at
    index `layer` -> (x, k, v, expert ids used [B,T,k] or None for a dense layer)."""
    h, k, v = self.attn.decode(self.input_layernorm(x), positions, k, v, layer)
    x, aux = self._ffn(x + h)
    return x, k, v, aux.get("moe_routing")


def _stack(cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> Block | None:
  """`count` Blocks with params stacked on a leading `layers` axis."""
  if count == 0:
    return None

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs: nnx.Rngs) -> Block:
    return Block(cfg, moe, rngs=rngs)

  return make(rngs)


def _remat(fn: Any, policy: str) -> Any:
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots)


def _run_stack(stack: Block, x: Any, xs: Any, step: Any, scan: bool, policy: str
               ) -> tuple[Any, Any]:
  """Runs `step(layer, x, per_layer_xs) -> (x, ys)` over a stack by lax.scan or a Python loop.

  `x` (the carry) may be a pytree."""
  graphdef, state = nnx.split(stack)

  def body(carry: Any, layer_in: Any) -> tuple[Any, Any]:
    layer_state, layer_xs = layer_in
    return step(nnx.merge(graphdef, layer_state), carry, layer_xs)

  body = _remat(body, policy)
  if scan:
    return jax.lax.scan(body, x, (state, xs))
  count = jax.tree.leaves(state)[0].shape[0]
  outs = []
  for i in range(count):
    x, ys = body(x, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
    outs.append(ys)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


class Transformer(nnx.Module):
  """GLM-4.5 / Qwen3-MoE style causal LM. `__call__` for training, `decode` for sampling."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    self.dense_layers = _stack(cfg, False, cfg.first_k_dense, rngs)
    self.moe_layers = _stack(cfg, True, cfg.num_moe_layers, rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None, routing: jax.Array | None = None,
               *, return_hidden: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens/positions [B,T] int -> (logits [B,T,V] fp32, aux).

    With `return_hidden`: (final-normed hidden [B,T,D] in the compute dtype, aux) instead of the
    logits, for losses that apply `head()` by tiles (`kernels/vocab`).

    `routing` [B,T,num_moe_layers,k] (routing replay, R3): expert ids recorded by the sampler;
    a token whose ids in a layer are all in [0, E) uses them instead of its own top-k there
    (gate weights still from this router, so it gets gradients); -1 = not recorded.

    aux: "moe_lb_loss", "router_z_loss", "moe_drop_rate" (fraction of routed copies dropped by
    moe_impl="capacity"), "moe_replay_flip" (with `routing`: share of recorded tokens whose own
    top-k differs from the replayed ids) (scalars, mean over MoE layers; 0 without MoE layers) and
    "moe_expert_load" ([num_moe_layers, E] fraction of routed slots per expert) and
    "moe_routing" ([B,T,num_moe_layers,k] int32 expert ids each token used).
    """
    cfg = self.cfg
    x = self.embedder.encode(tokens)

    def step(layer: Block, h: jax.Array, replay: Any) -> tuple[jax.Array, Any]:
      return layer(h, positions, segment_ids, replay)

    if self.dense_layers is not None:
      x, _ = _run_stack(self.dense_layers, x, None, step, False, cfg.remat_policy)
    aux = {name: jnp.zeros((), jnp.float32) for name in AUX_SCALARS}
    aux["moe_expert_load"] = jnp.zeros((0, cfg.num_experts), jnp.float32)
    aux["moe_routing"] = jnp.zeros((*tokens.shape, 0, cfg.num_experts_per_tok), jnp.int32)
    if self.moe_layers is not None:
      xs = None if routing is None else jnp.moveaxis(routing.astype(jnp.int32), 2, 0)
      x, layer_aux = _run_stack(self.moe_layers, x, xs, step, cfg.scan_layers, cfg.remat_policy)
      aux = {name: jnp.mean(layer_aux[name]) for name in AUX_SCALARS}
      aux["moe_expert_load"] = layer_aux["moe_expert_load"]
      aux["moe_routing"] = jnp.moveaxis(layer_aux["moe_routing"], 0, 2)
    x = self.final_norm(x)
    return (x if return_hidden else self.embedder.decode(x)), aux

  def head(self) -> tuple[jax.Array, str]:
    """(output head weight in the compute dtype, layout "dv" [D,V] or tied "vd" [V,D])."""
    return self.embedder.head()

  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
             with_routing: bool = False) -> Any:
    """Prefill (T>1) or decode (T=1): writes K/V at slots `positions`, attends to slots <= pos.

    Returns (logits, cache), or with `with_routing` (logits, cache, expert ids
    [B,T,num_moe_layers,k] int32) for routing replay.

    The whole cache is loop carry: each layer scatters only its new slots into it (at its layer
    index) and reads its own slice, so with the cache donated XLA updates it in place. Passing
    per-layer slices as scan inputs/outputs instead made XLA copy the whole cache several times
    per step, a cost growing with batch x max_len (docs/performance.md, decode batch scaling).
    """
    cfg = self.cfg
    x = self.embedder.encode(tokens)
    nd = cfg.first_k_dense

    def step(offset: int) -> Any:
      def run(layer: Block, carry: Any, i: jax.Array) -> tuple[Any, Any]:
        h, k, v = carry
        h, k, v, ids = layer.decode(h, positions, k, v, offset + i)
        return (h, k, v), ids
      return run

    carry = (x, cache.k, cache.v)
    routing = jnp.zeros((*tokens.shape, 0, cfg.num_experts_per_tok), jnp.int32)
    if self.dense_layers is not None:
      carry, _ = _run_stack(self.dense_layers, carry, jnp.arange(nd), step(0), False, "none")
    if self.moe_layers is not None:
      carry, ids = _run_stack(self.moe_layers, carry, jnp.arange(cfg.num_moe_layers), step(nd),
                              cfg.scan_layers, "none")
      routing = jnp.moveaxis(ids, 0, 2)
    x, k, v = carry
    logits, cache = self.embedder.decode(self.final_norm(x)), KVCache(k=k, v=v)
    return (logits, cache, routing) if with_routing else (logits, cache)

"""The model's forward over the paged KV pool, and the jitted steps the paged engine runs.

`forward` mirrors `Transformer.decode` (same submodules, same dtype policy: K/V are stored in the
pool's dtype and read back in the compute dtype) for a flat ragged batch of tokens: every layer
writes its tokens' K/V into their pages, then attends (paged/attention.py). `mixed_step` runs one
such batch (prefill chunks and single decode tokens together) and samples each sequence's next
token at its last token; `decode_steps` runs `steps` decode iterations in one device call, with
on-device sampling and stop checks, so a host round trip covers several tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.inference import sampling
from klong_jax.inference.paged import attention as paged_attention
from klong_jax.inference.paged.cache import TRASH_PAGE
from klong_jax.inference.sampler import _top_logprobs
from klong_jax.model.transformer import Block, _run_stack


def forward(model: Any, pool: jax.Array, tokens: jax.Array, positions: jax.Array,
            seq: jax.Array, valid: jax.Array, page_indices: jax.Array, kv_lens: jax.Array,
            cu_q_lens: jax.Array, num_seqs: jax.Array, *, impl: str, num_pages: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Tokens [N] of stream sequences `seq` [N] at `positions` [N] -> (final hidden [N, D] before
  the norm, new pool, expert ids [N, moe_layers, k])."""
  cfg = model.cfg
  ps = pool.shape[1]
  token_pages = page_indices[seq]  # [N, pages_per_seq]
  page = jnp.take_along_axis(token_pages, (positions // ps)[:, None], axis=1)[:, 0]
  page = jnp.where(valid, page, TRASH_PAGE)
  offset = jnp.where(valid, positions % ps, 0)
  backend = paged_attention.resolve(impl)

  def step(first: int) -> Any:
    def run(layer: Block, carry: Any, i: jax.Array) -> tuple[Any, Any]:
      h, pool = carry
      q, k, v = layer.attn._qkv(layer.input_layernorm(h), positions[None])
      base = (first + i) * num_pages
      o, pool = paged_attention.write_and_attend(
          backend, q[0], k[0], v[0], pool, base, page, offset, token_pages, positions, valid,
          page_indices, kv_lens, cu_q_lens, num_seqs)
      h, aux = layer._ffn(h + layer.attn._out(o[None]))
      return (h, pool), aux.get("moe_routing")
    return run

  carry = (model.embedder.encode(tokens[None]), pool)
  nd = cfg.first_k_dense
  routing = jnp.zeros((tokens.shape[0], 0, cfg.num_experts_per_tok), jnp.int32)
  if model.dense_layers is not None:
    carry, _ = _run_stack(model.dense_layers, carry, jnp.arange(nd), step(0), False, "none")
  if model.moe_layers is not None:
    carry, ids = _run_stack(model.moe_layers, carry, jnp.arange(cfg.num_moe_layers), step(nd),
                            cfg.scan_layers, "none")
    routing = jnp.moveaxis(ids[:, 0], 0, 1)  # [layers, 1, N, k] -> [N, layers, k].
  h, pool = carry
  return h[0], pool, routing


def _logits(model: Any, hidden: jax.Array) -> jax.Array:
  """[S, D] pre-norm hidden states -> [S, V] fp32 logits (norm + head on the sampled rows only)."""
  return model.embedder.decode(model.final_norm(hidden[None]))[0]


def _replicated(outs: Any) -> Any:
  """`outs` replicated on every chip: multi-host, each process (process 0 above all) can then
  read them from its own chips (a process reads no other host's shards)."""
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, jax.P()), outs)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "num_pages", "replicate"),
                   donate_argnames=("pool",))
def mixed_step(graphdef: Any, params: Any, rest: Any, pool: jax.Array, batch: dict[str, Any],
               *, impl: str, num_pages: int, replicate: bool = False) -> tuple[Any, ...]:
  """One ragged batch: writes every token's K/V and samples each stream sequence's next token
  from its token `sample_at[s]` -> (tokens [S], logprobs [3, S], top (ids, lps), routing [N, ...],
  pool). `replicate`: outputs on every chip (multi-host serving)."""
  model = nnx.merge(graphdef, params, rest)
  h, pool, routing = forward(model, pool, batch["tokens"], batch["positions"], batch["seq"],
                             batch["valid"], batch["page_indices"], batch["kv_lens"],
                             batch["cu_q_lens"], batch["num_seqs"], impl=impl,
                             num_pages=num_pages)
  logits = _logits(model, h[batch["sample_at"]])
  toks, lps = sampling.sample(logits, batch["temp"], batch["top_k"], batch["top_p"],
                              batch["seeds"], batch["counters"])
  top = _top_logprobs(logits, batch["temp"], batch["top_k"], batch["top_p"])
  if replicate:
    toks, lps, top, routing = _replicated((toks, lps, top, routing))
  return toks, lps, top, routing, pool


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "impl", "num_pages", "steps", "replicate"),
                   donate_argnames=("pool",))
def decode_steps(graphdef: Any, params: Any, rest: Any, pool: jax.Array, state: dict[str, Any],
                 *, impl: str, num_pages: int, steps: int, replicate: bool = False
                 ) -> tuple[Any, ...]:
  """`steps` decode iterations for S rows (row s = stream sequence s, one token each).

  state: tokens/positions/counters [S] (the token to feed, its position, its sample counter),
  remaining [S] (tokens the row may still generate; 0 = idle), stop_ids [S, M] (-1 padded),
  page_indices [S, P], temp/top_k/top_p/seeds [S]. A row stops on device after a stop id or when
  `remaining` runs out; its later outputs are garbage the host drops. Returns per-step stacks
  (tokens [steps, S], logprobs [steps, 3, S], top ids/lps, routing [steps, S, ...]) and the pool;
  `replicate` as in `mixed_step`.
  """
  model = nnx.merge(graphdef, params, rest)
  s = state["tokens"].shape[0]
  seq = jnp.arange(s, dtype=jnp.int32)
  cu_q_lens = jnp.arange(s + 1, dtype=jnp.int32)
  num_seqs = jnp.full((1,), s, jnp.int32)

  def body(carry: Any, _: Any) -> tuple[Any, Any]:
    pool, tokens, positions, counters, remaining = carry
    pool = paged_attention.constrain_pool(pool)  # The carry keeps the pool's layout.
    active = remaining > 0
    kv_lens = jnp.where(active, positions + 1, 1)
    h, pool, routing = forward(model, pool, tokens, positions, seq, active,
                               state["page_indices"], kv_lens, cu_q_lens, num_seqs, impl=impl,
                               num_pages=num_pages)
    logits = _logits(model, h)
    toks, lps = sampling.sample(logits, state["temp"], state["top_k"], state["top_p"],
                                state["seeds"], counters)
    top = _top_logprobs(logits, state["temp"], state["top_k"], state["top_p"])
    stopped = jnp.any(toks[:, None] == state["stop_ids"], axis=1)
    remaining = jnp.where(stopped, 0, jnp.maximum(remaining - 1, 0))
    carry = (paged_attention.constrain_pool(pool), toks, positions + 1, counters + 1, remaining)
    return carry, (toks, lps, top, routing)

  init = (paged_attention.constrain_pool(pool), state["tokens"], state["positions"],
          state["counters"], state["remaining"])
  (pool, *_), outs = jax.lax.scan(body, init, None, length=steps)
  toks, lps, top, routing = _replicated(outs) if replicate else outs
  return toks, lps, top, routing, pool

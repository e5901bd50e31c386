"""Per-token logprobs from the final hidden state without a [tokens, V] fp32 logits buffer.

The vocabulary is cut into blocks of <= `chunk_vocab` columns (the outer `lax.scan`, with an
online logsumexp) and the time axis into chunks of <= `chunk_tokens` positions (the inner scan;
the batch axis stays whole so its sharding stays put). A `jax.custom_vjp` keeps only hidden,
head, targets and the fp32 logsumexp for the backward pass, which recomputes each tile's logits;
so neither pass holds more than one [B, chunk_tokens, chunk_vocab] fp32 tile, plus [B, T]
running statistics and, in the backward, d hidden in fp32. Each head block is read (under FSDP:
all-gathered) once per pass and its gradient finished once. GSPMD cannot carry partial sums
through a loop, so accumulations over a sharded contraction are reduced every step: d head_j over
batch-sharded tokens once per token chunk (nt x the head's size in all; nt = T / chunk_tokens),
and, only when the vocab is sharded (tensor > 1), d hidden once per vocab block. The pod configs
shard the head over fsdp (tensor = 1), where the former is the only repeated collective.

Vocab block j holds the *strided* columns {i * nb + j}: reshaping V -> [cv, nb] keeps a
`vocab`-sharded head sharded on cv, so each block is a local slice of every shard (contiguous
blocks would put whole blocks on one shard). Token and vocab padding (sizes the chunks do not
divide) is masked: padded columns get logit -inf, padded positions are sliced off.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd

from klong_jax.parallel.rules import LOGICAL_RULES

DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_CHUNK_VOCAB = 8192


def blocks(size: int, chunk: int) -> tuple[int, int]:
  """(count, block size) covering `size` with blocks of about <= `chunk`.

  Prefers a count that divides `size` (no padding, and a sharded dim stays evenly split) among
  ceil(size/chunk) .. 2x that; else ceil(size/chunk) blocks with the tail padded.
  """
  chunk = max(1, min(int(chunk), size))
  n0 = -(-size // chunk)
  for n in range(n0, 2 * n0 + 1):
    if size % n == 0:
      return n, size // n
  return n0, -(-size // n0)


def _mesh_axes(name: str | None, mesh: jax.sharding.AbstractMesh) -> tuple[str, ...]:
  """Mesh axes (size > 1) a logical name maps to under the `nnx.logical_axis_rules` in force,
  else `parallel.rules.LOGICAL_RULES` (as `model.layers.mesh_axes`; kernels never import model)."""
  if name is None:
    return ()
  value = dict(core_spmd.get_logical_axis_rules() or LOGICAL_RULES).get(name)
  axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint by logical names, dropping any name whose mesh size does not divide its
  dim (a no-op without a mesh): the tiles keep the batch and vocab shardings of their inputs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  parts = []
  for dim, name in zip(x.shape, names, strict=True):
    axes = _mesh_axes(name, mesh)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      parts.append(axes[0] if len(axes) == 1 else axes)
    else:
      parts.append(None)
  return jax.lax.with_sharding_constraint(x, jax.P(*parts))


def _head_blocks(head: jax.Array, layout: str, nb: int, cv: int) -> jax.Array:
  """head [D, V] ("dv") or [V, D] ("vd") -> [nb, D, cv] / [nb, cv, D], block j = columns i*nb+j."""
  vocab_axis = 1 if layout == "dv" else 0
  pad = nb * cv - head.shape[vocab_axis]
  if pad:
    widths = [(0, 0), (0, 0)]
    widths[vocab_axis] = (0, pad)
    head = jnp.pad(head, widths)
  if layout == "dv":
    out = jnp.moveaxis(head.reshape(head.shape[0], cv, nb), 2, 0)
    return _constrain(out, (None, "embed", "vocab"))
  out = jnp.moveaxis(head.reshape(cv, nb, head.shape[1]), 1, 0)
  return _constrain(out, (None, "vocab", "embed"))


def _head_unblock(blocked: jax.Array, layout: str, vocab: int) -> jax.Array:
  """Inverse of `_head_blocks` (padding dropped)."""
  nb = blocked.shape[0]
  if layout == "dv":
    d, cv = blocked.shape[1:]
    return jnp.moveaxis(blocked, 0, 2).reshape(d, cv * nb)[:, :vocab]
  cv, d = blocked.shape[1:]
  return jnp.moveaxis(blocked, 0, 1).reshape(cv * nb, d)[:vocab]


class _Plan:
  """Static tiling of one call: layout, sizes, block counts."""

  def __init__(self, hidden: jax.Array, head: jax.Array, layout: str, temperature: float,
               chunk_tokens: int, chunk_vocab: int):
    if layout not in ("dv", "vd"):
      raise ValueError(f"head_layout must be 'dv' ([D, V]) or 'vd' (tied [V, D]), got {layout!r}")
    self.layout = layout
    self.temperature = float(temperature)
    self.length = hidden.shape[1]
    self.vocab = head.shape[1] if layout == "dv" else head.shape[0]
    self.nt, self.ct = blocks(self.length, chunk_tokens)
    self.nb, self.cv = blocks(self.vocab, chunk_vocab)

  def tile(self, h: jax.Array, w: jax.Array, j: jax.Array) -> jax.Array:
    """Tempered fp32 logits of token chunk h [B, ct, D] on vocab block j: [B, ct, cv]."""
    spec = "bcd,dk->bck" if self.layout == "dv" else "bcd,kd->bck"
    z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32) / self.temperature
    z = _constrain(z, ("act_batch", None, "act_vocab"))
    if self.nb * self.cv != self.vocab:
      col = jnp.arange(self.cv) * self.nb + j
      z = jnp.where(col < self.vocab, z, -jnp.inf)
    return z

  def hits(self, targets: jax.Array, j: jax.Array) -> jax.Array:
    """bool [B, ct, cv]: where vocab block j holds each position's target column."""
    in_block = (targets % self.nb) == j
    return in_block[..., None] & (jnp.arange(self.cv) == (targets // self.nb)[..., None])


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads the time axis (1) of x [B, T, ...] to `length`."""
  pad = length - x.shape[1]
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _chunk(x: jax.Array, i: jax.Array, ct: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * ct, ct, axis=1)


def _forward(plan: _Plan, hidden: jax.Array, head: jax.Array, targets: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """(logp, lse) [B, T] fp32 by tiles: vocab blocks outside, token chunks inside, so each head
  block is read (FSDP: all-gathered) once; the running max / sum / target logit are [B, T]."""
  wb = _head_blocks(head, plan.layout, plan.nb, plan.cv)
  padded = plan.nt * plan.ct
  hidden, targets = _pad_tokens(hidden, padded), _pad_tokens(targets, padded)

  def block(carry, ys):
    j, w = ys

    def chunk(carry, i):
      m, s, picked = carry
      h = _constrain(_chunk(hidden, i, plan.ct), ("act_batch", None, "act_embed"))
      t = _chunk(targets, i, plan.ct)
      z = plan.tile(h, w, j)
      m_old, s_old, p_old = (_chunk(a, i, plan.ct) for a in (m, s, picked))
      m_new = jnp.maximum(m_old, z.max(-1))
      s_new = s_old * jnp.exp(m_old - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)
      p_new = p_old + jnp.where(plan.hits(t, j), z, 0.0).sum(-1)
      put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i * plan.ct,
                              axis=1)
      return (put(m, m_new), put(s, s_new), put(picked, p_new)), None

    carry, _ = jax.lax.scan(chunk, carry, jnp.arange(plan.nt))
    return carry, None

  zeros = jnp.zeros(targets.shape, jnp.float32)
  init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros)
  (m, s, picked), _ = jax.lax.scan(block, init, (jnp.arange(plan.nb), wb))
  lse = (m + jnp.log(s))[:, :plan.length]
  return picked[:, :plan.length] - lse, lse


def _backward(plan: _Plan, hidden: jax.Array, head: jax.Array, targets: jax.Array,
              lse: jax.Array, g_logp: jax.Array, g_lse: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """(d hidden, d head) by recomputing each tile: dz = g_logp * (onehot - p) + g_lse * p.

  Vocab blocks outside (each head block read once, its gradient finished and cast once), token
  chunks inside; d hidden accumulates in fp32 [B, T, D]. The matmuls take dz / temperature in
  the inputs' dtype with fp32 accumulation (as the reference's transposed einsum does).
  """
  wb = _head_blocks(head, plan.layout, plan.nb, plan.cv)
  mm_dtype = jnp.promote_types(hidden.dtype, head.dtype)
  padded = plan.nt * plan.ct
  hidden, targets, lse, g_logp, g_lse = (_pad_tokens(a, padded)
                                         for a in (hidden, targets, lse, g_logp, g_lse))
  dh_spec = "bck,dk->bcd" if plan.layout == "dv" else "bck,kd->bcd"
  dw_spec = "bcd,bck->dk" if plan.layout == "dv" else "bcd,bck->kd"
  dw_names = ("embed", "vocab") if plan.layout == "dv" else ("vocab", "embed")

  def block(dh, ys):
    j, w = ys

    def chunk(carry, i):
      dh, dw = carry
      h = _constrain(_chunk(hidden, i, plan.ct), ("act_batch", None, "act_embed"))
      t, lse_c, g_lp, g_ls = (_chunk(a, i, plan.ct) for a in (targets, lse, g_logp, g_lse))
      z = plan.tile(h, w, j)
      p = jnp.exp(z - lse_c[..., None])
      dz = (g_ls - g_lp)[..., None] * p + jnp.where(plan.hits(t, j), g_lp[..., None], 0.0)
      dz = (dz / plan.temperature).astype(mm_dtype)
      dh_c = _chunk(dh, i, plan.ct) + jnp.einsum(dh_spec, dz, w,
                                                 preferred_element_type=jnp.float32)
      dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_c, i * plan.ct, axis=1)
      dw = dw + jnp.einsum(dw_spec, h, dz, preferred_element_type=jnp.float32)
      return (dh, _constrain(dw, dw_names)), None

    dw0 = _constrain(jnp.zeros(w.shape, jnp.float32), dw_names)
    (dh, dw), _ = jax.lax.scan(chunk, (dh, dw0), jnp.arange(plan.nt))
    return dh, dw.astype(head.dtype)

  dh0 = _constrain(jnp.zeros(hidden.shape, jnp.float32), ("act_batch", "act_seq", "act_embed"))
  dh, dw = jax.lax.scan(block, dh0, (jnp.arange(plan.nb), wb))
  d_head = _head_unblock(dw, plan.layout, plan.vocab)
  return dh[:, :plan.length].astype(hidden.dtype), d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _logprobs_lse(hidden, head, targets, layout, temperature, chunk_tokens, chunk_vocab):
  plan = _Plan(hidden, head, layout, temperature, chunk_tokens, chunk_vocab)
  return _forward(plan, hidden, head, targets)


def _fwd(hidden, head, targets, layout, temperature, chunk_tokens, chunk_vocab):
  plan = _Plan(hidden, head, layout, temperature, chunk_tokens, chunk_vocab)
  logp, lse = _forward(plan, hidden, head, targets)
  return (logp, lse), (hidden, head, targets, lse)


def _bwd(layout, temperature, chunk_tokens, chunk_vocab, res, g):
  hidden, head, targets, lse = res
  plan = _Plan(hidden, head, layout, temperature, chunk_tokens, chunk_vocab)
  g_logp, g_lse = g
  d_hidden, d_head = _backward(plan, hidden, head, targets, lse, g_logp, g_lse)
  return d_hidden, d_head, None


_logprobs_lse.defvjp(_fwd, _bwd)


def token_logprobs_from_hidden(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                               head_layout: str = "dv", temperature: float = 1.0,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                               chunk_vocab: int = DEFAULT_CHUNK_VOCAB, return_lse: bool = False
                               ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log softmax(hidden @ head / temperature)[target] in fp32, by tiles (see module doc).

  hidden [B, T, D] (or [N, D]), head [D, V] ("dv") or tied [V, D] ("vd"), targets int [B, T]
  (or [N]) in [0, V). Returns logp shaped like targets, with `return_lse` also the logsumexp of
  the tempered logits. Differentiable in hidden and head (both outputs).
  """
  flat = hidden.ndim == 2
  if flat:
    hidden, targets = hidden[None], targets[None]
  if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
    raise ValueError(f"hidden [B, T, D] / targets [B, T] expected, got {hidden.shape} / "
                     f"{targets.shape}")
  logp, lse = _logprobs_lse(hidden, head, targets.astype(jnp.int32), head_layout,
                            float(temperature), int(chunk_tokens), int(chunk_vocab))
  if flat:
    logp, lse = logp[0], lse[0]
  return (logp, lse) if return_lse else logp

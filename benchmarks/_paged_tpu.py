"""Paged attention and the paged decode call compiled for a v5p topology (compile only, libtpu on
a CPU host): per-chip bytes at a given max_len. No flags, so tests and benchmarks can import it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.inference.paged import model as paged_model
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer


def _one_v5p_chip() -> tuple[Any, Any]:
  """A one-chip mesh of a v5p:2x2x1 topology (compile-only, launch/tpu_topology.devices) and
  its replicated sharding."""
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from klong_jax.launch import tpu_topology
  devs = tpu_topology.devices(tpu_topology.parse_topology("v5p:2x2x1"))
  mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,), devices=devs[:1])
  return mesh, NamedSharding(mesh, P())


def tpu_compile_attention(max_len: int, *, pages: int = 1025, page: int = 16, seqs: int = 32,
                          tokens: int = 256, kv_heads: int = 8, q_heads: int = 16,
                          head_dim: int = 128, layers: int = 2) -> dict[str, Any]:
  """Compiles the paged attention ("auto" on a TPU mesh = the ragged kernel) for v5p:2x2x1 with
  a fixed pool and page tables wide enough for `max_len`; returns its per-chip bytes."""
  from klong_jax.inference.paged import attention as paged_attention
  mesh, rep = _one_v5p_chip()
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)

  def attend(q, pool, table, kv_lens, cu, num_seqs):
    assert paged_attention.resolve("auto") == "ragged"
    return paged_attention.ragged(q, pool, jnp.int32(pages), table, kv_lens, cu, num_seqs)

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(attend).lower(
        sds((tokens, q_heads, head_dim), jnp.bfloat16),
        sds((layers * pages, page, 2 * kv_heads, head_dim), jnp.bfloat16),
        sds((seqs, max_len // page), jnp.int32), sds((seqs,), jnp.int32),
        sds((seqs + 1,), jnp.int32), sds((1,), jnp.int32)).compile()
  mem = compiled.memory_analysis()
  return {"max_len": max_len, "compile_s": round(time.perf_counter() - start, 1),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "mosaic_custom_call": "tpu_custom_call" in compiled.as_text()}


def tpu_compile_decode(max_len: int, *, preset: str = "tiny", seqs: int = 8, pages: int = 257,
                       page: int = 16, steps: int = 4) -> dict[str, Any]:
  """Compiles the whole paged decode call (`steps` iterations, every layer, sampling) for
  v5p:2x2x1 ("auto" attention = the ragged kernel): bf16, head_dim 128 (the kernel's lane
  width), a fixed pool, page tables wide enough for `max_len`; returns its per-chip bytes."""
  mesh, rep = _one_v5p_chip()
  cfg = dataclasses.replace(get_preset(preset), dtype="bfloat16", head_dim=128)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                                     nnx.Not(nnx.RngState), ...)
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  params, rest = jax.tree.map(lambda x: sds(x.shape, x.dtype), (params, rest))
  pool = sds((cfg.num_layers * pages, page, 2 * cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  i32 = lambda *shape: sds(shape, jnp.int32)
  state = dict(tokens=i32(seqs), positions=i32(seqs), counters=i32(seqs), remaining=i32(seqs),
               stop_ids=i32(seqs, 4), page_indices=i32(seqs, max_len // page),
               temp=sds((seqs,), jnp.float32), top_k=i32(seqs), top_p=sds((seqs,), jnp.float32),
               seeds=sds((seqs,), jnp.uint32))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = paged_model.decode_steps.lower(graphdef, params, rest, pool, state, impl="auto",
                                              num_pages=pages, steps=steps).compile()
  mem = compiled.memory_analysis()
  return {"max_len": max_len, "preset": preset, "compile_s": round(time.perf_counter() - start, 1),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "mosaic_custom_calls": compiled.as_text().count("tpu_custom_call")}

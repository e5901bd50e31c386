"""The one logical-axis rules table, and helpers that apply it to params and inputs.

Modules name every weight and activation dim logically (`embed`, `mlp`, `expert`, `act_batch`);
this table alone maps those names to the mesh axes ("data", "fsdp", "expert", "tensor",
"context"). Weights and activations (`act_*`) are kept apart so each can be resharded on its own.
A config may pass its own table (`model.sharded.create_sharded_model`, the trainers'
`config.rules`). The table is data; the helpers below only read it (this package never imports
the model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # JAX-free at import: config files (loaded on fleet hosts) read the tables.
  import jax

Rules = tuple[tuple[str, Any], ...]

LOGICAL_RULES: Rules = (
    # Vocabulary / embedding.
    ("vocab", "tensor"),
    # Weights are FSDP-sharded over `context` too (else context parallelism would hold each
    # weight shard on every context device).
    ("embed", ("fsdp", "context")),
    # Attention.
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # Dense MLP.
    ("mlp", "tensor"),
    # MoE: experts over `expert`; their hidden dim over `tensor`; their model dim FSDP-sharded.
    ("expert", "expert"),
    ("expert_embed", ("fsdp", "context")),
    ("expert_mlp", "tensor"),
    # Stacked layers and norms stay replicated along those dims.
    ("layers", None),
    ("norm", None),
    # Activations.
    ("act_batch", ("data", "fsdp", "expert")),
    # Context parallelism: a row's sequence over `context` (size 1 unless a config sets it).
    # Attention re-shards it to heads (model/attention.py, all-to-all); the MoE treats those
    # tokens like any other token shard.
    ("act_seq", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Paged KV pool [layers * pages, page, 2 * kv_heads, head_dim] (inference/paged): kv heads
    # over `tensor` like the k/v activations (k and v of a head are adjacent, so a contiguous
    # shard holds whole heads); pages replicated over the other axes (`paged_pool_spec`).
    ("cache_pages", None),
    ("cache_kv_heads", "tensor"),
)

# Serving (inference servers): no FSDP. Weights stay put across decode steps: experts split over
# `expert` (expert parallelism: tokens travel by all-to-all, expert weights never gather), their
# hidden dim and the attention heads / dense MLP / vocab over `tensor` (tensor parallelism), the
# model dim of every weight unsharded. Activations and the KV cache rows split over the batch axes
# (data, expert): attention is data-parallel over the `expert` axis. Same names as training's.
SERVING_RULES: Rules = tuple(
    (name, {"embed": None, "expert_embed": None, "act_batch": ("data", "expert")}.get(name, axes))
    for name, axes in LOGICAL_RULES)
# Serving on one model axis (v6e-8: tensor 8): whole experts split over `tensor` (expert
# parallelism on the axis that also splits the attention heads / vocab), their hidden dim
# unsharded. Sharding glm45_air's expert hidden 1408 over 8 chips leaves 176 per chip, which TPU
# pads to 256 lanes in the layout the grouped matmul reads (weight_layout.py): +45% on the expert
# gate/up stacks, 32.0 GiB of weights per chip vs 31.25 of HBM. Whole experts (1408 = 11 x 128) need
# no padding; tokens are replicated over `tensor` (rows are on every chip: batch axes are size 1),
# so each chip runs its experts on every token and a psum over `tensor` sums the outputs, the
# same collective tensor parallelism has.
SERVING_EXPERTS_OVER_TENSOR_RULES: Rules = tuple(
    (name, {"expert": "tensor", "expert_mlp": None}.get(name, axes))
    for name, axes in SERVING_RULES)
NAMED_RULES: dict[str, Rules] = {"training": LOGICAL_RULES, "serving": SERVING_RULES,
                                 "serving_experts_over_tensor": SERVING_EXPERTS_OVER_TENSOR_RULES}


def resolve_rules(value: Any = None, default: Rules = LOGICAL_RULES) -> Rules:
  """A config's `rules` field: a table name (`NAMED_RULES`), a table, or None (default)."""
  if value is None or value == "" or value == ():
    return default
  if isinstance(value, str):
    if value not in NAMED_RULES:
      raise ValueError(f"rules {value!r} unknown; use one of {sorted(NAMED_RULES)} or a table")
    return NAMED_RULES[value]
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in value)


def kv_cache_sharding(mesh: jax.sharding.Mesh, rules: Rules, shape: tuple[int, ...],
                      batch_axis: int = 1) -> jax.sharding.NamedSharding:
  """Sharding of a dense [layers, B, S, kv_heads, head_dim] KV-cache leaf: rows over the batch
  axes (when they divide B), kv heads over the `act_kv_heads` axis (when it divides them); as the
  serving Sampler lays its cache out."""
  import jax  # noqa: PLC0415
  batch = batch_sharding(mesh, rules).spec[0]
  spec: list[Any] = [None] * len(shape)
  spec[batch_axis] = batch if shape[batch_axis] % data_parallel_size(
      batch_sharding(mesh, rules)) == 0 else None
  kv = activation_sharding(mesh, ("act_kv_heads",), rules).spec[0]
  kv_size = mesh.shape[kv] if isinstance(kv, str) else 1
  if len(shape) == 5 and batch_axis == 1 and shape[3] % kv_size == 0:
    spec[3] = kv
  return jax.sharding.NamedSharding(mesh, jax.P(*spec))


# Logical names of the paged KV pool's dims [layers * pages, page, 2 * kv_heads, head_dim].
PAGED_POOL_AXES = ("cache_pages", None, "cache_kv_heads", None)


def paged_pool_spec(mesh_shape: Mapping[str, int], rules: Rules, shape: tuple[int, ...]
                    ) -> jax.sharding.PartitionSpec:
  """PartitionSpec of the paged KV pool `shape` under `rules` on a mesh of `mesh_shape` (a Mesh's
  or an abstract mesh's `.shape`): the `cache_kv_heads` axes split the interleaved k/v head dim
  when they divide the kv heads (so every shard holds whole heads, each with its k and v), else
  it is replicated. The page dim must stay unsharded: a page id indexes the whole pool on every
  chip (the engine's one allocator); per-shard page ranges are not implemented."""
  import jax  # noqa: PLC0415

  def axes(name: str | None) -> tuple[str, ...]:
    return tuple(a for a in _lookup(rules, name) if mesh_shape.get(a, 1) > 1) if name else ()

  if axes(PAGED_POOL_AXES[0]):
    raise ValueError(f"rules map the paged pool's pages (cache_pages) to mesh axes "
                     f"{axes(PAGED_POOL_AXES[0])}: page ids are global, so pages must be "
                     "replicated (cache_pages: None)")
  heads = axes(PAGED_POOL_AXES[2])
  if not heads or (shape[2] // 2) % math.prod(mesh_shape[a] for a in heads):
    heads = ()
  return jax.P(None, None, heads[0] if len(heads) == 1 else (heads or None), None)


def paged_pool_sharding(mesh: jax.sharding.Mesh, rules: Rules, shape: tuple[int, ...]
                        ) -> jax.sharding.NamedSharding:
  """NamedSharding of the paged KV pool (`paged_pool_spec` on `mesh`)."""
  import jax  # noqa: PLC0415
  return jax.sharding.NamedSharding(mesh, paged_pool_spec(dict(mesh.shape), rules, shape))


def _lookup(rules: Rules, name: str) -> tuple[str, ...]:
  value = dict(rules).get(name)
  return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def shard_count(mesh_shape: Mapping[str, int], rules: Rules, name: str) -> int:
  """How many shards the mesh axes that logical `name` maps to split a dim into."""
  return math.prod(mesh_shape.get(a, 1) for a in _lookup(rules, name))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_RULES
                   ) -> jax.sharding.NamedSharding:
  """NamedSharding for [B, T] model inputs (batch over the `act_batch` mesh axes)."""
  import jax  # noqa: PLC0415
  axes = tuple(a for a in _lookup(rules, "act_batch") if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.P(axes or None, None))


def data_parallel_size(sharding: jax.sharding.NamedSharding) -> int:
  """Devices the batch dim of a `batch_sharding` is split over (rows must divide by it)."""
  first = sharding.spec[0] if len(sharding.spec) else None
  axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
  return int(math.prod(sharding.mesh.shape[a] for a in axes))


def activation_sharding(mesh: jax.sharding.Mesh, names: tuple[str | None, ...],
                        rules: Rules = LOGICAL_RULES) -> jax.sharding.NamedSharding:
  """NamedSharding for an activation with logical dim `names` (e.g. act_batch, act_seq)."""
  import jax  # noqa: PLC0415
  parts = []
  for name in names:
    axes = tuple(a for a in _lookup(rules, name) if a in mesh.axis_names) if name else ()
    parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.NamedSharding(mesh, jax.P(*parts))


def check_divisible(cfg: Any, mesh: jax.sharding.Mesh | Mapping[str, int],
                    rules: Rules = LOGICAL_RULES) -> None:
  """Raises ValueError naming the mesh axis and model field when a sharded dim does not divide.

  `mesh` is a Mesh or its axis sizes ({"expert": 8, ...}, as a pod plan has them before any
  device exists): the one check the trainers, the HF importer and `launch/tpu.py` all run.
  """
  import jax  # noqa: PLC0415
  shape = dict(mesh.shape) if isinstance(mesh, jax.sharding.Mesh) else dict(mesh)
  get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
  dims = {"vocab": "vocab_size", "embed": "hidden_size", "heads": "num_heads",
          "kv_heads": "num_kv_heads", "mlp": "intermediate_size", "expert": "num_experts",
          "expert_mlp": "moe_intermediate_size"}
  for logical, field in dims.items():
    size = get(field, 0)
    if not size:
      continue
    axes = tuple(a for a in _lookup(rules, logical) if a in shape)
    n = math.prod(shape[a] for a in axes)
    if size % n:
      raise ValueError(f"mesh axes {axes} (size {n}) do not divide model.{field}={size} "
                       f"(logical axis {logical!r}); change the mesh or the model config")

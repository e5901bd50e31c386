"""Device layout of the served weights: on TPU, row-major (last dim minor) for weights whose
per-chip last dim is not a multiple of 128, the layout the model's (grouped) matmuls read. One
place for the Sampler / PagedEngine placement and the serving plan (launch/serve_plan.py).

Why: TPU's default layout then puts another dim minor (libtpu: [.., 4096, 704] bf16 gets
major_to_minor (.., 3, 2)), e.g. glm45_air's expert gate/up stacks [L, E, 4096, 704] per chip,
while the grouped matmul reads the expert hidden dim minor. XLA relayouts such a weight inside
every call, and in a multi-step decode call (serve.decode_steps >= 2) hoists a copy of the whole
stacks out of the step loop (128 GiB of temporaries on v5p-8, refused). Weights placed row-major
(`jax.experimental.layout.Format`) need no copy. Other weights keep TPU's default (forcing every
weight row-major added relayout copies of the attention k/v weights in a reduced TPU compile).
Off TPU (CPU, GPU) the default layout is row-major already: the helpers return the plain
sharding, i.e. change nothing.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.layout import Format, Layout


def _on_tpu(sharding: Any) -> bool:
  devices = getattr(sharding, "device_set", None)
  return bool(devices) and next(iter(devices)).platform == "tpu"


def weight_format(shape: tuple[int, ...], sharding: Any) -> Any:
  """`sharding` with a row-major device layout (a `Format`) for a TPU weight of `shape` whose
  per-chip last dim is not a multiple of 128; `sharding` itself otherwise (off TPU, vectors,
  lane-aligned weights). Accepted by device_put and ShapeDtypeStruct."""
  if sharding is None or len(shape) < 2 or not _on_tpu(sharding):
    return sharding
  if sharding.shard_shape(tuple(shape))[-1] % 128 == 0:
    return sharding
  return Format(Layout(major_to_minor=tuple(range(len(shape)))), sharding)


def laid_out_bytes(shape: tuple[int, ...], dtype: Any, sharding: Any) -> int:
  """Per-chip bytes of a served weight as TPU stores it: a row-major one (`weight_format`) has
  its last dim padded to 128 lanes and its second-minor dim to the dtype's sublane tile (8 rows
  of 32 bits), e.g. glm45_air's gate/up at tensor 8, [.., 4096, 176] -> 256 lanes: +45%. Other
  weights as their shapes count them (TPU's default layout then picks a minor dim that needs no
  padding, as the compiler's buffer assignment shows for the expert down stacks)."""
  import numpy as np  # noqa: PLC0415
  itemsize = np.dtype(dtype).itemsize
  local = list(sharding.shard_shape(tuple(shape)) if sharding is not None else shape)
  if isinstance(weight_format(tuple(shape), sharding), Format):
    sublane = 8 * max(1, 4 // itemsize)
    local[-1] = -(-local[-1] // 128) * 128
    local[-2] = -(-local[-2] // sublane) * sublane
  return int(np.prod(local, dtype=np.int64)) * itemsize


def place(x: Any, sharding: Any) -> jax.Array:
  """`x` on `sharding` in the served weights' layout (`weight_format`)."""
  return jax.device_put(x, weight_format(jax.numpy.shape(x), sharding))


def place_tree(tree: Any) -> Any:
  """Every jax.Array leaf of `tree` in the served weights' layout, on its own sharding
  (committed: jit keys its cache on committedness and reads a committed argument's layout)."""
  return jax.tree.map(lambda x: place(x, x.sharding) if isinstance(x, jax.Array) else x, tree)


def abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  """An abstract served weight carrying the layout `place` gives it (for lowering the steps)."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=weight_format(shape, sharding))

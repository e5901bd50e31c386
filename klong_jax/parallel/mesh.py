"""Device mesh from config (axes data, fsdp, expert, tensor, context) and multi-host start-up."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from klong_jax.config_util import MESH_AXES


class MeshError(ValueError):
  """A mesh config that cannot be built; the message names the axis."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = the rest) against `num_devices`; names a bad axis."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, shape, strict=True) if s == -1]
  for axis, size in zip(MESH_AXES, shape, strict=True):
    if size == 0 or size < -1:
      raise MeshError(f"mesh axis {axis!r} has size {size}; use a positive size or -1")
  if len(fill) > 1:
    raise MeshError(f"mesh axes {fill} are all -1; at most one axis may fill the rest")
  known = math.prod(s for s in shape if s != -1)
  if fill:
    if num_devices % known:
      raise MeshError(f"mesh axis {fill[0]!r}=-1: the other axes (product {known}) do not divide "
                      f"{num_devices} devices")
    shape[MESH_AXES.index(fill[0])] = num_devices // known
  elif known != num_devices:
    bad = next((a for a, s in zip(MESH_AXES, shape, strict=True) if num_devices % s), None)
    where = f"mesh axis {bad!r}={shape[MESH_AXES.index(bad)]} does not divide" if bad else \
        f"mesh axes {dict(zip(MESH_AXES, shape, strict=True))} (product {known}) do not match"
    raise MeshError(f"{where} the {num_devices} devices; set one axis to -1 to fill")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | Any | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh with axes ("data","fsdp","expert","tensor","context"), AxisType.Auto, from `config.mesh`.

  Missing axes default to 1; with no sizes at all, fsdp fills every device.
  """
  if sizes is None:
    sizes = {"fsdp": -1}
  if hasattr(sizes, "to_dict"):
    sizes = sizes.to_dict()
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except NotImplementedError:
    # A TPU torus whose physical axes cannot each hold whole mesh axes (v6e-256 is 16x16:
    # fsdp 32 x expert 8 must split a physical axis); allow the split rather than fail.
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize when args or env (KLONG_COORDINATOR, ...) say multi-host.

  Env: KLONG_COORDINATOR=host:port, KLONG_NUM_PROCESSES, KLONG_PROCESS_ID; on TPU pods
  KLONG_DISTRIBUTED=1 lets JAX auto-detect. Returns True if it initialised.
  """
  coordinator = coordinator or os.environ.get("KLONG_COORDINATOR")
  if num_processes is None and "KLONG_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["KLONG_NUM_PROCESSES"])
  if process_id is None and "KLONG_PROCESS_ID" in os.environ:
    process_id = int(os.environ["KLONG_PROCESS_ID"])
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
  if os.environ.get("KLONG_DISTRIBUTED", "") not in ("", "0"):
    jax.distributed.initialize()
    return True
  return False

"""TPU topologies on a CPU-only host: accelerator names -> libtpu devices, HBM, HLO collectives.

libtpu (the `jax[tpu]` extra) holds the TPU compiler; `jax.experimental.topologies` gives devices
of a TPU slice that jit can lower and compile for without a TPU (MaxText's train_compile.py does
the same). Nothing here runs on a TPU: the plan uses `memory_analysis()` and the compiled HLO.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

GIB = float(1 << 30)
# version -> (TensorCores per chip counted in the accelerator name, HBM GiB per chip, 3-D torus).
# v5p and v6e: the HBM the TPU compiler reports available (its out-of-memory messages, libtpu
# 0.0.42: "available HBM (95.74G)", "(31.25G)"); v4 / v5e: the nominal size.
VERSIONS = {"v4": (2, 32.0, True), "v5p": (2, 95.74, True), "v5e": (1, 16.0, False),
            "v5litepod": (1, 16.0, False), "v6e": (1, 31.25, False)}
# libtpu's topology name prefix per version (v5litepod is v5e's accelerator-type spelling).
_TOPO_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice as libtpu names it: e.g. v5p-256 = "v5p:4x4x8", 128 chips, 95 GiB each."""

  accelerator: str  # "v5p-256" (or the topology name when given as one).
  version: str
  dims: tuple[int, ...]
  hbm_gib: float

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def name(self) -> str:
    """libtpu's topology name, e.g. "v5p:4x4x8"."""
    return f"{_TOPO_PREFIX[self.version]}:{'x'.join(map(str, self.dims))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips of one host along each torus axis: 2x2x1 (4 chips; a lone 8-chip v5e/v6e host 2x4)."""
    dims = tuple(self.dims) + (1,) * (3 - len(self.dims))
    if not VERSIONS[self.version][2] and self.chips == 8:
      return (2, 4, 1)
    return tuple(min(d, b) for d, b in zip(dims, (2, 2, 1), strict=True))


def _torus_dims(chips: int, three_d: bool) -> tuple[int, ...]:
  """The standard slice shape: v5p-256 (128 chips) -> 4x4x8; v6e-256 -> 16x16."""
  if three_d:
    dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
  else:
    dims = [2, 2] if chips >= 4 else [chips, 1]
  while math.prod(dims) < chips:
    small = min(dims)
    i = max(j for j, d in enumerate(dims) if d == small)
    dims[i] *= 2
  if math.prod(dims) != chips:
    raise ValueError(f"{chips} chips is not a standard slice size (a power of two)")
  return tuple(dims)


def parse_topology(spec: str) -> Topology:
  """'v5p-256' (accelerator type, TensorCores on v4/v5p) or 'v5p:2x2x1' (libtpu topology)."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", spec)
  t = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", spec)
  version = (m or t).group(1) if (m or t) else None
  if version not in VERSIONS:
    raise ValueError(f"--topology={spec!r} not understood; use an accelerator type (v5p-256, "
                     f"v5p-8, v6e-8, v6e-256) or a topology (v5p:2x2x1); versions "
                     f"{sorted(VERSIONS)}")
  cores, hbm, three_d = VERSIONS[version]
  if t:
    return Topology(spec, version, tuple(int(d) for d in t.group(2).split("x")), hbm)
  count = int(m.group(2))
  if count % cores:
    raise ValueError(f"{spec}: {count} TensorCores is not a whole number of chips")
  try:
    return Topology(spec, version, _torus_dims(count // cores, three_d), hbm)
  except ValueError as e:
    raise ValueError(f"{spec}: {e}; use e.g. v5p-8, v5p-128, v5p-256, v6e-8, v6e-256") from None


def libtpu_status() -> str | None:
  """None when libtpu (the TPU compiler) imports, else why not (the plan then uses fake CPUs)."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    return (f"libtpu cannot be imported ({e}); install the TPU compiler with "
            "pip install 'jax[tpu]' (the dev extra has it) to plan for a real TPU")
  return None


def devices(topo: Topology) -> list[Any]:
  """The slice's TPU devices (compile-only) from libtpu; JAX itself stays on CPU."""
  # Only quiets libtpu's start-up probing for a TPU VM's metadata; nothing runs on a TPU.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator if "-" in topo.accelerator
                        else f"{topo.version}-{topo.chips * VERSIONS[topo.version][0]}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only: several planners (and test workers) may load libtpu at once on one host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  problem = libtpu_status()
  if problem:
    raise RuntimeError(problem)
  from jax.experimental import topologies

  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.name, chip_config_name="default",
      chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1)
  return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class Collective:
  """HLO collective instructions of one kind: how many, and the bytes of their results."""

  count: int
  bytes: float


def collectives(hlo_text: str) -> dict[str, Collective]:
  """Collectives in compiled HLO by kind (async `-start` halves counted; `-done` not).

  Counts are static: an op inside a scanned layer's loop body appears once. Bytes are the
  per-chip result buffers (the largest buffer of an async start's tuple).
  """
  ops = "|".join(re.escape(k) for k in sorted(COLLECTIVES, key=len, reverse=True))
  pattern = re.compile(rf"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+({ops})(-start)?\(", re.M)
  out: dict[str, list[float]] = {k: [0, 0.0] for k in COLLECTIVES}
  for shape, kind, start in pattern.findall(hlo_text):
    sizes = [_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)]
    out[kind][0] += 1
    out[kind][1] += float(max(sizes, default=0) if start else sum(sizes))
  return {k: Collective(int(c), b) for k, (c, b) in out.items() if c}


_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]+)\]")


def square_buffers(hlo_text: str, length: int) -> list[str]:
  """Distinct HLO shapes with at least two dims >= `length` (e.g. a [T, T] attention score),
  largest first: the buffers whose size grows with the square of the sequence."""
  found = set()
  for m in _SHAPE.finditer(hlo_text):
    dims = [int(d) for d in m.group(1).split(",") if d]
    if sum(d >= length for d in dims) >= 2:
      found.add(m.group(0))
  return sorted(found, key=lambda s: -len(s))


def collectives_table(found: dict[str, Collective]) -> list[str]:
  """Report lines: one per collective kind present."""
  if not found:
    return ["  collectives: none in the HLO"]
  lines = [f"  {'collectives (HLO instructions)':32s} {'count':>9s} {'MiB':>9s}"]
  lines += [f"  {k:32s} {c.count:9d} {c.bytes / (1 << 20):9.1f}" for k, c in found.items()]
  return lines


_OOM = (re.compile(r"exceeds available HBM"), re.compile(r"RESOURCE_EXHAUSTED"),
        re.compile(r"[Rr]an out of memory"))


def compiler_oom(error: BaseException) -> str | None:
  """The TPU compiler's own out-of-HBM sentence when `error` is one, else None."""
  text = str(error)
  if not any(p.search(text) for p in _OOM):
    return None
  for line in text.splitlines():
    if any(p.search(line) for p in _OOM[:1] + _OOM[2:]):
      return line.strip()
  return text.strip().splitlines()[0][:400]


def required_bytes(message: str) -> float | None:
  """The figure in "total memory required ... (582.16G) exceeds ..." (bytes), if present."""
  m = re.search(r"\(([\d.]+)([KMGT])\)\s*exceeds", message)
  if not m:
    return None
  return float(m.group(1)) * 1024.0 ** "KMGT".index(m.group(2)) * 1024.0


def describe(topo: Topology, device_list: Sequence[Any]) -> str:
  """'v5p-256 (v5p:4x4x8, 128 chips of TPU v5, 95 GiB HBM)'."""
  kind = getattr(device_list[0], "device_kind", topo.version) if device_list else topo.version
  name = "" if topo.name == topo.accelerator else f"{topo.name}, "
  return f"{topo.accelerator} ({name}{topo.chips} chips of {kind}, {topo.hbm_gib:g} GiB HBM)"

"""Accelerator peak table: dense bf16 FLOP/s, HBM capacity and bandwidth per chip, by device kind.

MFU needs the peak of the chip a step ran on; `jax.Device.device_kind` names it ("TPU v5 lite",
"NVIDIA H100 80GB HBM3"). Figures are the vendors' published per-chip numbers for dense (not
2:4-sparse) bf16 matmuls. CPUs have no meaningful peak here: `lookup` returns None and callers
report achieved FLOP/s only. Imports no JAX (the planner and docs use the table on any host).
"""

from __future__ import annotations

import dataclasses
import re

TERA = 1e12
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Per-chip peak dense bf16 FLOP/s, HBM bytes and HBM bandwidth (bytes/s) of one device kind."""

  name: str
  peak_bf16_flops: float
  hbm_bytes: float
  hbm_bandwidth: float


# Sources: Google Cloud TPU system-architecture pages (v4, v5e, v5p, v6e) and NVIDIA H100/H200
# datasheets (SXM parts; H100 PCIe listed apart). Bandwidth in bytes/s.
_SPECS: tuple[tuple[str, DeviceSpec], ...] = (
    (r"tpu\s*v6\s*(e|lite)|trillium",
     DeviceSpec("TPU v6e", 918 * TERA, 32 * GIB, 1640e9)),
    (r"tpu\s*v5\s*(e|lite)",
     DeviceSpec("TPU v5e", 197 * TERA, 16 * GIB, 819e9)),
    (r"tpu\s*v5\s*p?$|tpu\s*v5p",
     DeviceSpec("TPU v5p", 459 * TERA, 95 * GIB, 2765e9)),
    (r"tpu\s*v4",
     DeviceSpec("TPU v4", 275 * TERA, 32 * GIB, 1200e9)),
    (r"h100.*pcie",
     DeviceSpec("H100 PCIe", 756 * TERA, 80e9, 2000e9)),
    (r"h100",
     DeviceSpec("H100 SXM", 989 * TERA, 80e9, 3350e9)),
    (r"h200",
     DeviceSpec("H200", 989 * TERA, 141e9, 4800e9)),
)


def lookup(device_kind: str) -> DeviceSpec | None:
  """The spec for a `jax.Device.device_kind` string (case-insensitive), or None (CPU, unknown)."""
  kind = device_kind.strip().lower()
  for pattern, spec in _SPECS:
    if re.search(pattern, kind):
      return spec
  return None


def peak_flops(device_kind: str) -> float | None:
  """Per-chip dense bf16 peak FLOP/s, or None when the kind has no entry (e.g. "cpu")."""
  spec = lookup(device_kind)
  return None if spec is None else spec.peak_bf16_flops

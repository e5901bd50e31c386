"""Can this run start? Mesh vs chips, batch vs batch axes, model dims vs axes; no devices needed.

The same checks run in `launch.plan` (before compiling) and `launch/tpu.py --dry_run`, so a
config they pass does not fail the trainer's own divisibility checks at its first step. Each
error names the config field to change and a value that works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from klong_jax.launch.tpu_topology import GIB
from klong_jax.parallel import rules as rules_lib


class StartupError(ValueError):
  """A config that cannot start on this slice; the message names the fix."""


class MemoryVerdict:
  """Peak and FITS of one compiled step's per-chip figures (bytes), shared by the training plan
  (launch/plan.Plan) and the serving plan (serve_plan.ServePlan). Needs the fields `arguments`,
  `output_not_aliased`, `temp`, `hbm`, `refused`, `required` and a `persistent` property."""

  arguments: float
  output_not_aliased: float
  temp: float
  hbm: float | None
  refused: str
  required: float | None

  @property
  def persistent(self) -> float:
    raise NotImplementedError

  @property
  def peak(self) -> float:
    """Arguments + fresh outputs + temp: an upper bound on live bytes during the step; when the
    TPU compiler refused, its own figure (at least the persistent bytes).

    (XLA:CPU's own `peak_memory_in_bytes` leaves temp out, so it is not used.)
    """
    if self.refused:
      return max(self.required or 0.0, self.persistent)
    return self.arguments + self.output_not_aliased + self.temp

  @property
  def fits(self) -> bool | None:
    """False when refused, None without an HBM size, else peak <= HBM."""
    if self.refused:
      return False
    return None if self.hbm is None else self.peak <= self.hbm

  def verdict_line(self, hbm_digits: int = 1) -> str | None:
    """The report's "HBM x GiB: FITS (y% of HBM)" line; None without an HBM size or refusal."""
    if self.hbm is None and not self.refused:
      return None
    verdict = "FITS" if self.fits else "DOES NOT FIT"
    hbm = f"HBM {self.hbm / GIB:.{hbm_digits}f} GiB: " if self.hbm is not None else ""
    share = f" ({100 * self.peak / self.hbm:.0f}% of HBM)" if self.hbm and self.peak else ""
    return f"  {hbm}{verdict}{share}"


def batch_axes(mesh: Mapping[str, int], rules: Any = rules_lib.LOGICAL_RULES
               ) -> tuple[tuple[str, ...], int]:
  """(mesh axes the batch rows are split over, their product), from the `act_batch` rule."""
  value = dict(rules).get("act_batch")
  axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
  axes = tuple(a for a in axes if a in mesh)
  return axes, int(math.prod(mesh[a] for a in axes))


def check_mesh(mesh: Mapping[str, int], chips: int, where: str) -> None:
  """The mesh must use exactly the slice's chips."""
  size = math.prod(mesh.values())
  if size != chips:
    raise StartupError(f"mesh {dict(mesh)} has {size} devices but {where} has {chips} chips; "
                       f"set the axis sizes to multiply to {chips} (or one axis to -1 in the "
                       "config's mesh section to fill the slice)")


def check_batch(batch: int, mesh: Mapping[str, int], rules: Any = rules_lib.LOGICAL_RULES,
                field: str = "data.batch_size") -> None:
  """Global rows must split evenly over the batch mesh axes (data x fsdp x expert)."""
  axes, n = batch_axes(mesh, rules)
  if batch < 1 or batch % n:
    up = max(n, -(-batch // n) * n)
    raise StartupError(
        f"{field}={batch} does not divide over the batch mesh axes {'*'.join(axes)} = {n} "
        f"devices (mesh {dict(mesh)}); use {field}={up} (a multiple of {n}), or put devices "
        f"on the tensor axis (rows are not split over it) until {'*'.join(axes)} divides "
        f"{batch}")


def check_rl_minibatch(batch: int, rl: Any, mesh: Mapping[str, int],
                       rules: Any = rules_lib.LOGICAL_RULES) -> None:
  """Each PPO minibatch (data.batch_size / rl.minibatches rows) must split over the batch axes."""
  mbs = int(rl.get("minibatches", 1)) if rl is not None else 1
  if mbs < 1 or batch % mbs:
    raise StartupError(f"data.batch_size={batch} does not split into rl.minibatches={mbs} equal "
                       "minibatches; change either")
  _, n = batch_axes(mesh, rules)
  if (batch // mbs) % n:
    raise StartupError(
        f"an RL minibatch of data.batch_size / rl.minibatches = {batch}/{mbs} = {batch // mbs} "
        f"rows does not divide over the batch mesh axes ({n} devices); use "
        f"data.batch_size={mbs * n * max(1, -(-(batch // mbs) // n))} or fewer rl.minibatches")


def check_model(model: Any, mesh: Mapping[str, int], rules: Any = rules_lib.LOGICAL_RULES
                ) -> None:
  """Experts vs the expert axis, heads/kv_heads/mlp vs the tensor axis, embed vs fsdp."""
  try:
    rules_lib.check_divisible(model, mesh, rules)
  except ValueError as e:
    raise StartupError(str(e)) from None


def check_startable(model: Any, mesh: Mapping[str, int], batch: int, *, chips: int | None = None,
                    where: str = "the slice", rules: Any = rules_lib.LOGICAL_RULES,
                    rl: Any = None) -> None:
  """Every check above; raises StartupError (a ValueError) with the fix on the first failure."""
  rules = tuple(rules or rules_lib.LOGICAL_RULES)
  if chips is not None:
    check_mesh(mesh, chips, where)
  check_model(model, mesh, rules)
  check_batch(batch, mesh, rules)
  if rl is not None:
    check_rl_minibatch(batch, rl, mesh, rules)

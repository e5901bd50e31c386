"""Fits the token clock's rates to the wall clock, from the trajectories of a rollout stream.

  python -m klong_jax.agent.calibrate --stream=DIR|gs://... [--out=rates.json] \\
      [--fit=auto|calls|episodes] [--min_tool_calls=20] [--trim=0.02]

Every trajectory records both clocks (agent/budget.py): `metadata.budget` holds the episode's
wall time (agent loop, retries excluded) and the token clock's counts (uncached prefill tokens,
generated tokens, tool calls), and since per-call records landed each assistant message's
`meta` holds its call's prefill/generated tokens and wall latency, each tool message's `meta`
its wall and CPU seconds. The fit is non-negative least squares (numpy Lawson-Hanson; scipy is
no dependency):

* "calls": per model call, latency ~ prefill_s_per_token x prefill + decode_s_per_token x
  generated; per tool, its mean wall seconds (the `tool_costs` table). Identifies the rates
  cleanly; scaffold time outside calls is reported as the unexplained share.
* "episodes": per episode, wall agent seconds ~ the same terms summed over the episode, tool
  calls counted by name: what the wall clock's limit measured, fitted directly.
* "auto": calls when every usable trajectory has per-call records, else episodes.

`--trim` refits without the share of calls (episodes) slowest relative to the first fit: a cold
server compiling its shapes stalls its first calls for tens of seconds, wall time the token
clock rightly leaves out (the episode quality is also shown with those stalls taken off). Each
rate comes with its least-squares standard error: episodes that all ran alike cannot separate
prefill, decode and tool terms, and say so (inf when collinear). Tool wall time against the
sandbox's CPU seconds is reported too (what `tool_cost="cpu"` would charge).

Prints the config overrides (`--config.workers.*` of configs/demo.py and rl_glm45_air.py, and the
worker's own flags) and the fit quality: R^2 and the relative error per episode of the fitted
token clock against the wall clock, next to the same for the rates the stream was recorded with.
Calibrate on a run at the load the wall clock would see (a pod, or a quiet box): the wall time
of a loaded box is what the token clock exists to leave out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

DEFAULT_TOOL = "default"


class CalibrationError(ValueError):
  """The stream holds nothing to fit (no trajectories, or none with the records the fit needs)."""


@dataclasses.dataclass
class Episode:
  """One trajectory's budget records."""

  id: str
  wall_s: float                     # Agent-loop wall seconds, model-API retries excluded.
  prefill: int                      # Uncached prefill tokens charged (the token clock's count).
  decode: int                       # Generated tokens.
  tools: collections.Counter        # Tool calls by name.
  token_clock_s: float | None       # What the recorded rates charged.
  calls: list[tuple[int, int, float]]       # (prefill, generated, latency_s) per model call.
  tool_calls: list[tuple[str, float, float | None]]  # (name, wall_s, cpu_s) per tool call.

  @property
  def has_calls(self) -> bool:
    """Whether every model and tool call carries its per-call record."""
    return bool(self.calls) and len(self.tool_calls) == sum(self.tools.values())


def episode_of(traj: Any) -> Episode | None:
  """The budget records of a trajectory (schema.Trajectory or alike); None when it has none
  (an infra error, or a worker from before the clock recorded `metadata.budget`)."""
  budget = (traj.metadata or {}).get("budget") or {}
  wall, tok = budget.get("wall"), budget.get("tokens")
  if traj.status == "infra_error" or not wall or not tok:
    return None
  calls, tool_calls, tools = [], [], collections.Counter()
  n_assistant = 0
  for m in traj.messages:
    meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
    if m.get("role") == "assistant":
      n_assistant += 1
      if "latency_s" in meta and "prefill_tokens" in meta:
        calls.append((int(meta["prefill_tokens"]), int(meta["completion_tokens"]),
                      float(meta["latency_s"])))
    elif m.get("role") == "tool":
      name = str(m.get("name") or "")
      tools[name] += 1
      if "wall_s" in meta:
        cpu = meta.get("cpu_s")
        tool_calls.append((name, float(meta["wall_s"]), None if cpu is None else float(cpu)))
  if len(calls) != n_assistant:
    calls = []  # partial records (a resumed episode from an older worker): not per-call usable
  t = (traj.timings or {}).get("token_clock_s")
  return Episode(id=str(traj.id), wall_s=float(wall["total_s"]) - float(wall.get("retry_s", 0.0)),
                 prefill=int(tok.get("prefill_tokens", 0)), decode=int(tok.get("decode_tokens", 0)),
                 tools=tools, token_clock_s=None if t is None else float(t), calls=calls,
                 tool_calls=tool_calls)


def load_episodes(stream: str) -> tuple[list[Episode], int]:
  """(usable episodes, trajectories read) of every shard under `stream`; a clear error when
  there is nothing to fit."""
  from klong_jax.data import shards  # noqa: PLC0415 (array_record only when reading)
  try:
    trajs = list(shards.iter_trajectories(stream))
  except FileNotFoundError as e:
    raise CalibrationError(f"{stream}: {e}; --stream must be a rollout stream dir (or gs:// "
                           "prefix) holding <stage>/*.array_record shards") from None
  eps = [e for e in map(episode_of, trajs) if e is not None]
  if not trajs:
    raise CalibrationError(f"{stream}: no trajectories in any shard; point --stream at a rollout "
                           "stream (RL `<workdir>/stream`, or an eval's stream dir) that has "
                           "published groups")
  if not eps:
    raise CalibrationError(
        f"{stream}: none of its {len(trajs)} trajectories records metadata.budget (both clocks); "
        "they are infra errors or come from workers older than the budget clock. Roll out again "
        "with the current klong_jax.rollout.worker (any --budget_clock records both clocks)")
  return eps, len(trajs)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 0) -> np.ndarray:
  """argmin_x ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = a.shape[1]
  x, passive = np.zeros(n), np.zeros(n, bool)
  tol = 10 * np.finfo(np.float64).eps * np.linalg.norm(a, 1) * max(a.shape)
  for _ in range(max_iter or 3 * n + 10):
    w = a.T @ (b - a @ x)
    if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
      break
    passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
    while True:
      z = np.zeros(n)
      z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
      if np.all(z[passive] > 0):
        x = z
        break
      neg = passive & (z <= 0)
      alpha = np.min(x[neg] / (x[neg] - z[neg]))
      x = x + alpha * (z - x)
      passive &= x > tol
      x[~passive] = 0.0
  return x


@dataclasses.dataclass
class Fit:
  """Fitted rates and how well they predict each episode's wall time."""

  mode: str
  prefill_s_per_token: float
  decode_s_per_token: float
  tool_costs: dict[str, float]
  episodes: int
  trajectories: int
  quality: dict[str, Any]
  recorded: dict[str, Any]

  def tool_costs_flag(self) -> str:
    return ",".join(f"{k}={v:.4g}" for k, v in self.tool_costs.items())

  def overrides(self) -> list[str]:
    """`--config.workers.*` overrides of the demo / pod configs."""
    return [f"--config.workers.prefill_s_per_token={self.prefill_s_per_token:.4g}",
            f"--config.workers.decode_s_per_token={self.decode_s_per_token:.4g}",
            "--config.workers.tool_cost=table",
            f"--config.workers.tool_costs={self.tool_costs_flag()}"]

  def worker_flags(self) -> list[str]:
    """The same as `klong_jax.rollout.worker` / eval flags."""
    return [o.replace("--config.workers.", "--") for o in self.overrides()]

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), overrides=self.overrides(),
                worker_flags=self.worker_flags())


def tool_names(eps: Sequence[Episode], min_calls: int) -> list[str]:
  """Tools with >= `min_calls` calls get their own cost; the rest share `default`."""
  counts = collections.Counter()
  for e in eps:
    counts.update(e.tools)
  return sorted(n for n, c in counts.items() if c >= min_calls and n != DEFAULT_TOOL)


def _tool_matrix(eps: Sequence[Episode], names: Sequence[str]) -> np.ndarray:
  """Tool calls per episode: one column per named tool, then the rest (`default`)."""
  out = np.zeros((len(eps), len(names) + 1))
  for i, e in enumerate(eps):
    for name, k in e.tools.items():
      out[i, names.index(name) if name in names else len(names)] += k
  return out


def predict(eps: Sequence[Episode], prefill: float, decode: float,
            costs: dict[str, float]) -> np.ndarray:
  """Token-clock seconds of each episode under the given rates and table."""
  default = costs.get(DEFAULT_TOOL, 0.0)
  return np.array([e.prefill * prefill + e.decode * decode
                   + sum(k * costs.get(n, default) for n, k in e.tools.items()) for e in eps])


def quality(pred: np.ndarray, wall: np.ndarray) -> dict[str, Any]:
  """R^2 of the prediction against the wall times and the relative error per episode."""
  ss_res = float(np.sum((wall - pred) ** 2))
  ss_tot = float(np.sum((wall - wall.mean()) ** 2))
  rel = np.abs(pred - wall) / np.maximum(wall, 1e-9)
  return {"r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
          "rel_err_median": float(np.median(rel)), "rel_err_p90": float(np.quantile(rel, 0.9)),
          "rel_err_max": float(rel.max()), "ratio_total": float(pred.sum() / wall.sum()),
          "wall_s_mean": float(wall.mean())}


def trimmed_nnls(a: np.ndarray, b: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
  """NNLS on columns scaled to a max of 1, refitted without the `trim` share of rows that took
  longest beyond the fit, relative to it (stalls: a cold server compiling its first shapes, a
  weight swap); returns (x, the indices of the rows left out)."""
  scale = np.maximum(np.abs(a).max(0), 1e-12)  # tokens vs call counts
  x = nnls(a / scale, b) / scale
  n_out = int(math.floor(trim * len(b)))
  if n_out <= 0:
    return x, np.zeros((0,), np.int64)
  pred = a @ x
  rel = (b - pred) / np.maximum(pred, 1e-3 * max(float(np.mean(b)), 1e-12))  # noise scales
  order = np.argsort(rel)
  keep = order[:len(b) - n_out]
  return nnls(a[keep] / scale, b[keep]) / scale, np.sort(order[len(b) - n_out:])


def standard_errors(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Least-squares standard errors of `x` (the unconstrained covariance at the fit): how well
  the data separate the terms; episodes that all ran alike leave the token rates undetermined."""
  scale = np.maximum(np.abs(a).max(0), 1e-12)
  if np.linalg.matrix_rank(a / scale) < a.shape[1]:
    return np.full(a.shape[1], np.inf)  # collinear terms: not separable at all
  dof = max(1, a.shape[0] - a.shape[1])
  s2 = float(np.sum((b - a @ x) ** 2)) / dof
  return np.sqrt(np.maximum(0.0, np.diag(np.linalg.pinv(a.T @ a)) * s2))


def _trimmed_mean(values: list[float], trim: float) -> float:
  v = np.sort(np.asarray(values, np.float64))
  return float(v[:max(1, len(v) - int(math.floor(trim * len(v))))].mean())


def _fit_calls(eps: Sequence[Episode], names: Sequence[str],
               trim: float) -> tuple[float, float, dict[str, float], np.ndarray,
                                     np.ndarray]:
  """Rates from the calls, tool costs from the tools; also each episode's stall seconds (its
  trimmed calls' latency beyond the fit)."""
  calls = np.array([c for e in eps for c in e.calls], np.float64)
  owner = np.array([i for i, e in enumerate(eps) for _ in e.calls])
  (pre, dec), out = trimmed_nnls(calls[:, :2], calls[:, 2], trim)
  kept = np.setdiff1d(np.arange(len(calls)), out)
  se = standard_errors(calls[kept, :2], calls[kept, 2], np.array([pre, dec]))
  stall = np.zeros(len(eps))
  np.add.at(stall, owner[out], np.maximum(0.0, calls[out, 2] - calls[out, :2] @ [pre, dec]))
  by_name: dict[str, list[float]] = collections.defaultdict(list)
  for e in eps:
    for name, wall_s, _ in e.tool_calls:
      by_name[name if name in names else DEFAULT_TOOL].append(wall_s)
  costs = {n: _trimmed_mean(by_name[n], trim) for n in names if by_name.get(n)}
  rest = by_name.get(DEFAULT_TOOL) or [w for v in by_name.values() for w in v]
  costs[DEFAULT_TOOL] = _trimmed_mean(rest, trim) if rest else 0.0
  return float(pre), float(dec), costs, stall, se


def _fit_episodes(eps: Sequence[Episode], names: Sequence[str],
                  trim: float) -> tuple[float, float, dict[str, float], np.ndarray,
                                        np.ndarray]:
  tools = _tool_matrix(eps, names)
  a = np.concatenate([np.array([[e.prefill, e.decode] for e in eps], np.float64), tools], 1)
  wall = np.array([e.wall_s for e in eps])
  x, out = trimmed_nnls(a, wall, trim)
  kept = np.setdiff1d(np.arange(len(wall)), out)
  se = standard_errors(a[kept], wall[kept], x)[:2]
  costs = {n: float(v) for n, v in zip(names, x[2:-1], strict=True)}
  used_default = tools[:, -1].sum() > 0
  costs[DEFAULT_TOOL] = float(x[-1]) if used_default else (
      float(np.average(x[2:-1], weights=tools[:, :-1].sum(0))) if names else 0.0)
  return float(x[0]), float(x[1]), costs, out, se


def tool_cpu(eps: Sequence[Episode]) -> dict[str, Any]:
  """How tool wall time follows the sandbox's CPU time (the token clock's `tool_cost="cpu"`
  charges the CPU seconds as they are): calls measured, wall = k x cpu slope, correlation."""
  t = np.array([(w, c) for e in eps for _, w, c in e.tool_calls if c is not None], np.float64)
  if len(t) < 3 or t[:, 1].std() == 0 or t[:, 0].std() == 0:
    return {"calls": int(len(t))}
  return {"calls": int(len(t)), "wall_per_cpu_s": float(nnls(t[:, 1:], t[:, 0])[0]),
          "corr": float(np.corrcoef(t.T)[0, 1])}


def fit(eps: Sequence[Episode], mode: str = "auto", min_tool_calls: int = 20,
        trajectories: int = 0, trim: float = 0.0) -> Fit:
  """Fits the rates (see the module docstring); `mode` auto | calls | episodes; `trim` the share
  of the slowest-beyond-the-fit calls (or episodes) refitted without, and of each tool's calls
  left out of its mean."""
  if not 0.0 <= trim < 0.5:
    raise ValueError(f"trim {trim} must be in [0, 0.5)")
  if mode not in ("auto", "calls", "episodes"):
    raise ValueError(f"fit mode {mode!r} must be auto, calls or episodes")
  if not eps:
    raise CalibrationError("no episodes to fit")
  with_calls = all(e.has_calls for e in eps)
  if mode == "calls" and not with_calls:
    n = sum(not e.has_calls for e in eps)
    raise CalibrationError(f"{n} of {len(eps)} episodes lack per-call records (message `meta` "
                           "latency_s / wall_s, written by workers since the calibration tool "
                           "landed); use --fit=episodes or roll out again")
  mode = "calls" if mode == "calls" or (mode == "auto" and with_calls) else "episodes"
  if mode == "episodes" and len(eps) < 3:
    raise CalibrationError(f"an episode-level fit needs >= 3 episodes, got {len(eps)}")
  names = tool_names(eps, min_tool_calls)
  # extra: the trimmed episodes' indices (episodes), each episode's stall seconds (calls)
  pre, dec, costs, extra, se = (_fit_calls if mode == "calls" else _fit_episodes)(
      eps, names, trim)
  wall = np.array([e.wall_s for e in eps])
  pred = predict(eps, pre, dec, costs)
  q = dict(quality(pred, wall), trimmed=len(extra) if mode == "episodes" else int(
      math.floor(trim * sum(len(e.calls) for e in eps))), tool_cpu=tool_cpu(eps),
           se={"prefill_s_per_token": float(se[0]), "decode_s_per_token": float(se[1])})
  if mode == "calls" and extra.any():  # the wall clock without the trimmed calls' stalls
    q["without_stalls"] = quality(pred, wall - extra)
  recorded: dict[str, Any] = {}
  rec = [e.token_clock_s for e in eps]
  if all(r is not None for r in rec):
    recorded = quality(np.array(rec, np.float64), wall)
  return Fit(mode, pre, dec, costs, len(eps), trajectories or len(eps), q, recorded)


def report(f: Fit, stream: str) -> str:
  """The human-readable summary printed by the CLI."""
  def line(q: dict[str, Any]) -> str:
    return (f"R^2 {q['r2']:.3f}, relative error per episode median {q['rel_err_median']:.1%} "
            f"p90 {q['rel_err_p90']:.1%} max {q['rel_err_max']:.1%}, token/wall total "
            f"{q['ratio_total']:.3f}")
  se = f.quality["se"]
  out = [f"stream {stream}: {f.episodes} episodes of {f.trajectories} trajectories, fit by "
         f"{f.mode} (mean wall {f.quality['wall_s_mean']:.2f} s per episode; "
         f"{f.quality['trimmed']} slowest {'calls' if f.mode == 'calls' else 'episodes'} "
         "refitted without)",
         f"  prefill_s_per_token {f.prefill_s_per_token:.4g} (± {se['prefill_s_per_token']:.2g}),"
         f" decode_s_per_token {f.decode_s_per_token:.4g} (± {se['decode_s_per_token']:.2g}), "
         f"tool_costs {f.tool_costs_flag()}",
         f"  fitted clock vs wall: {line(f.quality)}"]
  if f.quality.get("without_stalls"):
    out.append(f"  fitted clock vs wall less the trimmed calls' stalls: "
               f"{line(f.quality['without_stalls'])}")
  if f.recorded:
    out.append(f"  recorded clock vs wall: {line(f.recorded)}")
  tc = f.quality.get("tool_cpu") or {}
  if "wall_per_cpu_s" in tc:
    out.append(f"  tools: wall = {tc['wall_per_cpu_s']:.3g} x sandbox CPU seconds (correlation "
               f"{tc['corr']:.2f} over {tc['calls']} calls; tool_cost=cpu charges 1x)")
  out += ["config overrides:", "  " + " ".join(f.overrides()),
          "worker flags:", "  " + " ".join(f.worker_flags())]
  return "\n".join(out)


def _finite(obj: Any) -> Any:
  """NaN and infinities -> None throughout (strict JSON)."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv: Iterable[str] | None = None) -> int:
  """CLI (see the module docstring)."""
  import argparse  # noqa: PLC0415
  p = argparse.ArgumentParser(prog="python -m klong_jax.agent.calibrate",
                              description=__doc__.split("\n")[0])
  p.add_argument("--stream", required=True, help="Rollout stream dir or gs:// prefix.")
  p.add_argument("--out", default="", help="Write the fit as JSON here.")
  p.add_argument("--fit", default="auto", choices=("auto", "calls", "episodes"))
  p.add_argument("--min_tool_calls", type=int, default=20,
                 help="Tools with fewer calls share the `default` cost.")
  p.add_argument("--trim", type=float, default=0.02,
                 help="Share of the slowest-beyond-the-fit calls (episodes) refitted without: "
                      "a cold server's first calls compile (tens of seconds each).")
  a = p.parse_args(None if argv is None else list(argv))
  try:
    eps, n = load_episodes(a.stream)
    f = fit(eps, a.fit, a.min_tool_calls, trajectories=n, trim=a.trim)
  except CalibrationError as e:
    raise SystemExit(f"calibrate: {e}") from None
  print(report(f, a.stream))
  if a.out:
    from klong_jax.data import storage  # noqa: PLC0415
    text = json.dumps(_finite(f.to_json()), indent=1)
    if storage.is_gcs(a.out):
      storage.write(a.out, text.encode())
    else:
      with open(a.out, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
  return 0


if __name__ == "__main__":
  main()

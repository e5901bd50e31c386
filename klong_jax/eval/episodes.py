"""Paired, per-family, per-failure-mode eval reports over episodes (JAX-free).

An eval stream (worker shards, `klong_jax.demo` evals) is read into `Episode`s keyed by the
trajectory id `<task>-s<stage>-r<round>-<member>`: the same key in every arm evaluated with the
same settings, so two arms are compared by per-episode (paired) differences. Each episode carries
its task family (the id's prefix) and its failure tags (`diagnose.classify`). The report gives
every arm's mean reward with t and bootstrap intervals (over seeds too when there are several),
per family and per failure mode, and each arm's paired difference to a baseline arm.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax.eval import diagnose
from klong_jax.eval import stats as st

ALL = "all"


@dataclasses.dataclass(frozen=True)
class Episode:
  """One graded eval rollout. `key` pairs it across arms; `reward` None = infra error."""

  key: str
  seed: int
  task_id: str
  family: str
  reward: float | None
  status: str
  tags: tuple[str, ...] = ()

  @property
  def pair_key(self) -> tuple[int, str]:
    return (self.seed, self.key)


def family_of(task_id: str) -> str:
  """The task family of a bundled task id (`arith-sweep1`, `fib-rl2`, `gd-t1` -> its prefix)."""
  return task_id.split("-", 1)[0]


def from_trajectory(t: Any, seed: int = 0) -> Episode:
  """An Episode of a graded Trajectory (schema.Trajectory)."""
  tags: tuple[str, ...] = ()
  if t.reward is not None:
    tags = tuple(diagnose.classify(t, diagnose.bundled_task(t.task_id))["tags"])
  return Episode(key=t.id, seed=int(seed), task_id=t.task_id, family=family_of(t.task_id),
                 reward=None if t.reward is None else float(t.reward), status=t.status,
                 tags=tags)


def read_episodes(stream: str, seed: int = 0) -> list[Episode]:
  """Every episode in the shards under `stream` (an eval's stream dir), tagged with `seed`."""
  from klong_jax.data.shards import iter_trajectories  # noqa: PLC0415 - shard reader

  eps = [from_trajectory(t, seed) for t in iter_trajectories(stream)]
  dup = [k for k, c in collections.Counter(e.pair_key for e in eps).items() if c > 1]
  if dup:
    raise ValueError(f"{stream}: episode keys {dup[:3]} occur more than once; one eval per "
                     "stream dir (a second eval into it must use a new dir)")
  return eps


def _graded(eps: Sequence[Episode]) -> list[Episode]:
  return [e for e in eps if e.reward is not None]


def _by_seed(eps: Sequence[Episode], value: Any) -> dict[int, list[float]]:
  out: dict[int, list[float]] = collections.defaultdict(list)
  for e in eps:
    out[e.seed].append(float(value(e)))
  return dict(sorted(out.items()))


def _interval(eps: Sequence[Episode], value: Any, level: float) -> dict[str, Any]:
  """Mean of value(e) with the t interval over episodes, the bootstrap (two-stage over seeds
  when there are several) and, with several seeds, the t interval over the seed means."""
  by_seed = _by_seed(eps, value)
  s = st.seed_summary(by_seed, level)
  out = {"mean": s["over_episodes"]["mean"], "n": s["episodes"], "t": s["over_episodes"],
         "bootstrap": s["bootstrap"], "per_seed": s["per_seed"]}
  if len(by_seed) > 1:
    out["over_seeds"] = s["over_seeds"]
  return out


def summarize_arm(eps: Sequence[Episode], level: float = st.LEVEL) -> dict[str, Any]:
  """One arm: reward overall and per family; per failure tag its rate and mean reward."""
  g = _graded(eps)
  fams = sorted({e.family for e in g})
  tags = sorted({t for e in g for t in e.tags})
  return {
      "episodes": len(g), "infra_errors": len(eps) - len(g),
      "seeds": sorted({e.seed for e in g}),
      "reward": _interval(g, lambda e: e.reward, level),
      "families": {f: _interval([e for e in g if e.family == f], lambda e: e.reward, level)
                   for f in fams},
      "modes": {t: {"rate": _interval(g, lambda e, t=t: t in e.tags, level),
                    "mean_reward": st.fmean_or_none([e.reward for e in g if t in e.tags])}
                for t in tags},
      "clean_rate": _interval(g, lambda e: not e.tags, level),
  }


def _paired(a: Sequence[Episode], b: Sequence[Episode], value: Any,
            level: float) -> dict[str, Any]:
  return st.paired_difference({e.pair_key: float(value(e)) for e in a},
                              {e.pair_key: float(value(e)) for e in b}, level,
                              cluster=lambda k: k[0])


def compare_arms(base: Sequence[Episode], other: Sequence[Episode],
                 level: float = st.LEVEL) -> dict[str, Any]:
  """other - base by paired episodes: reward overall and per family, failure-tag rates."""
  a, b = _graded(base), _graded(other)
  fams = sorted({e.family for e in a} | {e.family for e in b})
  tags = sorted({t for e in (*a, *b) for t in e.tags})
  return {
      "reward": _paired(a, b, lambda e: e.reward, level),
      "families": {f: _paired([e for e in a if e.family == f], [e for e in b if e.family == f],
                              lambda e: e.reward, level) for f in fams},
      "modes": {t: _paired(a, b, lambda e, t=t: t in e.tags, level) for t in tags},
  }


def report(arms: Mapping[str, Sequence[Episode]], baseline: str | None = None,
           level: float = st.LEVEL) -> dict[str, Any]:
  """Every arm summarized, and every other arm's paired difference to `baseline`."""
  if baseline is not None and baseline not in arms:
    raise ValueError(f"baseline arm {baseline!r} not among the arms {list(arms)}")
  out: dict[str, Any] = {"level": level, "baseline": baseline,
                         "arms": {k: summarize_arm(v, level) for k, v in arms.items()}}
  if baseline is not None:
    out["vs_baseline"] = {k: compare_arms(arms[baseline], v, level)
                          for k, v in arms.items() if k != baseline}
  return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _iv(d: Mapping[str, Any] | None, key: str = "t", signed: bool = False) -> str:
  return "-" if not d else st.fmt(d[key], signed=signed)


def markdown(rep: Mapping[str, Any], labels: Mapping[str, str] | None = None,
             title: str = "") -> str:
  """Tables: reward per arm (t / bootstrap / over seeds), per family, per failure mode, and the
  paired differences to the baseline next to the unpaired interval."""
  labels = labels or {}
  arms = rep["arms"]
  pct = int(round(100 * rep["level"]))
  lines = [f"### {title}", ""] if title else []
  lines.append(_md_table(
      ["arm", "episodes", f"reward, {pct}% t CI (episodes)", "bootstrap (seeds x episodes)",
       "t CI over seed means", "per seed", "infra errors"],
      [[labels.get(k, k), str(a["episodes"]), _iv(a["reward"]), _iv(a["reward"], "bootstrap"),
        _iv(a["reward"].get("over_seeds") and a["reward"], "over_seeds"),
        ", ".join(f"{v:.3f}" for v in a["reward"]["per_seed"].values()),
        str(a["infra_errors"])] for k, a in arms.items()]))
  fams = sorted({f for a in arms.values() for f in a["families"]})
  lines += ["", f"Per family (mean reward, {pct}% t CI over episodes):", "", _md_table(
      ["family", *[labels.get(k, k) for k in arms]],
      [[f, *[_iv(a["families"].get(f)) for a in arms.values()]] for f in fams])]
  tags = sorted({t for a in arms.values() for t in a["modes"]})
  if tags:
    lines += ["", f"Per failure mode (share of episodes with the tag, {pct}% t CI; "
              "tags from eval/diagnose.py):", "", _md_table(
                  ["failure mode", *[labels.get(k, k) for k in arms]],
                  [[t, *[_iv(a["modes"][t]["rate"]) if t in a["modes"] else "0" for a in
                         arms.values()]] for t in tags] +
                  [["(no tag)", *[_iv(a["clean_rate"]) for a in arms.values()]]])]
  vs = rep.get("vs_baseline") or {}
  if vs:
    base = labels.get(rep["baseline"], rep["baseline"])
    rows = []
    for k, c in vs.items():
      r = c["reward"]
      rows.append([labels.get(k, k), str(r["n_pairs"]), _iv(r, "paired_t", True),
                   _iv(r, "paired_bootstrap", True), _iv(r, "welch", True),
                   "-" if r["correlation"] is None else f"{r['correlation']:.2f}",
                   {True: "yes", False: "no", None: "n/a"}[
                       st.Interval(**r["paired_t"]).excludes(0.0)]])
    lines += ["", f"Difference to {base} (paired by task x episode x seed):", "", _md_table(
        ["arm", "pairs", f"paired diff, {pct}% t CI", "paired bootstrap", "unpaired (Welch)",
         "pair correlation", "CI excludes 0"], rows)]
    lines += ["", f"Per family, paired difference to {base} ({pct}% t CI):", "", _md_table(
        ["family", *[labels.get(k, k) for k in vs]],
        [[f, *[_iv(c["families"].get(f), "paired_t", True) for c in vs.values()]]
         for f in fams])]
  return "\n".join(lines) + "\n"

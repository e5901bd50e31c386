"""The ablation's episode-level report: every evaluated policy (arm, and progressive RL after each
stage) on each task set, paired to split SFT episode by episode, per family and failure mode, with
confidence intervals; the RL arms' rollout budget in the run's clock; reward on the RL tasks by
RL step per family (JAX-free).

Evaluated points of one seed (`<out>/seed<k>/<arm>/`): truncated and split -> `eval_sft`; an RL
arm -> `eval_stage<s>` after each stage but the last (progressive arms, `--stage_evals`) and
`eval_rl` after the last. Each holds one eval per task set (`pipeline.eval_dir`).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax.demo import pipeline
from klong_jax.demo.rewards import iter_trajectories
from klong_jax.eval import episodes as ep_lib
from klong_jax.eval import plots
from klong_jax.eval import stats as st

BASELINE = "split"
# Where a trajectory records its cost in a budget clock (timings key), per clock name; other
# clocks: `clock_<name>` then `<name>`. "wall": the agent loop's own seconds; "tokens": the
# deterministic clock (agent/budget.py) as worker.rollout records it.
COST_KEYS = {"wall": ("agent_s",), "tokens": ("token_clock_s",)}


def stage_dir(wd: str, stage: int) -> str:
  return os.path.join(wd, f"eval_stage{stage}")


def eval_points(wd: str, arm: str) -> list[tuple[str, str]]:
  """(point name, eval phase dir) of one arm's workdir, in training order."""
  if not arm.startswith("rl_"):
    return [(arm, os.path.join(wd, "eval_sft"))]
  stages = sorted(int(d.removeprefix("eval_stage")) for d in _listdir(wd)
                  if d.startswith("eval_stage") and d.removeprefix("eval_stage").isdigit())
  return ([(f"{arm}@stage{s}", stage_dir(wd, s)) for s in stages]
          + [(arm, os.path.join(wd, "eval_rl"))])


def _listdir(d: str) -> list[str]:
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def collect_episodes(out: str, seeds: int, arms: Sequence[str], sets: Sequence[str]
                     ) -> dict[str, dict[str, list[ep_lib.Episode]]]:
  """{task set: {point: episodes over every seed}} of every finished eval (a `done` file)."""
  res: dict[str, dict[str, list[ep_lib.Episode]]] = {s: {} for s in sets}
  for seed in range(seeds):
    for arm in arms:
      for point, phase in eval_points(os.path.join(out, f"seed{seed}", arm), arm):
        for s in sets:
          d = pipeline.eval_dir(phase, s)
          if os.path.exists(os.path.join(d, "done")):
            res[s].setdefault(point, []).extend(
                ep_lib.read_episodes(os.path.join(d, "stream"), seed))
  return res


def episode_report(by_set: Mapping[str, Mapping[str, Sequence[ep_lib.Episode]]],
                   labels: Mapping[str, str]) -> tuple[dict[str, Any], str]:
  """Per task set: every point vs the split arm (paired); returns (json, markdown)."""
  js: dict[str, Any] = {}
  md = []
  for s, points in by_set.items():
    if not points:
      continue
    base = BASELINE if BASELINE in points else None
    rep = ep_lib.report(points, base)
    js[s] = rep
    md.append(ep_lib.markdown(rep, _point_labels(points, labels),
                              title=f"{'held-out' if s == 'heldout' else 'RL'} tasks ({s})"))
  return js, "\n".join(md)


def _point_labels(points: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, str]:
  out = {}
  for p in points:
    arm, _, stage = p.partition("@")
    out[p] = labels.get(arm, arm) + (f", after {stage}" if stage else "")
  return out


def _cost(timings: Mapping[str, Any], clock: str) -> float | None:
  for k in COST_KEYS.get(clock, (f"clock_{clock}", clock)):
    v = timings.get(k)
    if v is not None:
      return float(v)
  return None


def _consumed_ids(rl_dir: str) -> set[str] | None:
  path = os.path.join(rl_dir, "consumed.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return {i for ln in f if ln.strip() for i in json.loads(ln).get("ids", [])}


def rl_budget(rl_dir: str, clock: str) -> dict[str, Any]:
  """The rollout budget an RL run used, in `clock` units: summed over the rollouts the trainer
  consumed (consumed.jsonl; every one when it is missing), per stage, and the final stage's mean
  cost per consumed rollout (what budget matching divides by); and over every rollout generated.
  Consumed, not generated, is the budget: async workers run ahead of the trainer and the
  launcher stops them at the end, so generated counts an overshoot that depends on the speed
  (measured: 64 generated vs 12 consumed in a CI-sized run). Groups the trainer drops are not
  in it. Rollouts without a cost in the clock are counted in `missing_cost`."""
  used = _consumed_ids(rl_dir)
  tot: dict[str, float] = collections.defaultdict(float)
  n: dict[str, int] = collections.defaultdict(int)
  by_stage: dict[int, list[float]] = collections.defaultdict(list)
  missing = 0
  for t in iter_trajectories(os.path.join(rl_dir, "stream")):
    c = _cost(t.timings, clock)
    if c is None:
      missing += 1
      continue
    tot["generated"] += c
    n["generated"] += 1
    if used is None or t.id in used:
      tot["consumed"] += c
      n["consumed"] += 1
      by_stage[int(t.stage)].append(c)
  last = by_stage[max(by_stage)] if by_stage else []
  return {"clock": clock, "consumed": tot["consumed"], "consumed_n": n["consumed"],
          "generated": tot["generated"], "generated_n": n["generated"],
          "consumed_from_log": used is not None, "missing_cost": missing,
          "by_stage": {str(s): {"sum": sum(v), "n": len(v)} for s, v in sorted(by_stage.items())},
          "final_stage_mean": sum(last) / len(last) if last else None}


def rl_reward_by_step(out: str, seeds: int, arm: str) -> dict[str, dict[int, list[float]]]:
  """{family: {RL step: rewards}} of an RL arm's rollouts on the RL tasks, over seeds; the step
  is the policy version that sampled the rollout (its oldest token's)."""
  res: dict[str, dict[int, list[float]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for seed in range(seeds):
    stream = os.path.join(out, f"seed{seed}", arm, "rl", "stream")
    if not os.path.isdir(stream):
      continue
    for t in iter_trajectories(stream):
      if t.reward is None:
        continue
      v = t.policy_version[t.policy_version >= 0]
      if v.size:
        res[ep_lib.family_of(t.task_id)][int(v.min())].append(float(t.reward))
  return {f: dict(sorted(d.items())) for f, d in sorted(res.items())}


def by_step_intervals(series: Mapping[str, Mapping[int, Sequence[float]]]
                      ) -> dict[str, list[dict[str, Any]]]:
  """{family: [{"step", t interval over rollouts}]} (plus "all": every family pooled)."""
  pooled: dict[int, list[float]] = collections.defaultdict(list)
  out: dict[str, list[dict[str, Any]]] = {}
  for fam, steps in series.items():
    out[fam] = [{"step": s, **st.t_interval(v).to_dict()} for s, v in steps.items()]
    for s, v in steps.items():
      pooled[s].extend(v)
  out[ep_lib.ALL] = [{"step": s, **st.t_interval(v).to_dict()} for s, v in sorted(pooled.items())]
  return out


def plot_by_step(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], path: str,
                 labels: Mapping[str, str]) -> str:
  """The RL arms' reward on the RL tasks by step, one panel per family (eval/plots.py)."""
  return plots.reward_by_step_png(
      curves, path, labels,
      "Reward on the RL tasks by RL step, per family (95% t CI over rollouts and seeds)")

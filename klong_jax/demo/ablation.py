"""The KLong ablation on the long-horizon suite, over seeds: one command, a JSON + Markdown table.

  python -m klong_jax.demo.ablation --out=runs/ablation --seeds=3 [--config=configs/demo.py]

Arms (the paper's Table: base SFT 38.6 -> split SFT 55.9 -> RL 2h/4h/6h 57.3/58.7/62.6), each
held-out reward after the arm, per seed:
  truncated  SFT on the first max_len tokens of each trajectory only (no splitting),
  split      trajectory-splitting SFT (the same distilled data, the same steps),
  rl_prog    split SFT + progressive RL (the config's stages of growing time limits),
  rl_fixed   split SFT + RL at the final time limit from the start (one stage, same steps),
  rl_prog_no_r3  rl_prog with MoE routing replay (R3) off in the trainer and its workers: R3 on
             vs off on the same SFT checkpoint (the RL arms take `rl.routing_replay` from the
             config, default on; each RL arm also records the sampler-vs-trainer mismatch).
Every arm of a seed shares that seed's tokenizer and distilled trajectories; the RL arms start
from the split arm's checkpoint. Each arm is a `klong_jax.demo` run in its own dir (phases that
finished are skipped on a re-run, so an interrupted ablation resumes).

Evals (issue #31): every evaluated policy runs `--eval_episodes` episodes (default 100) on each
task set of `--eval_sets` (held-out and the RL tasks), the same task x episode keys in every arm,
so arms are compared by paired differences (ablation_report.py: per family, per failure mode,
t and bootstrap intervals, over seeds). Progressive RL is also evaluated after each stage
(`--stage_evals`). Equal budget (`--budget=matched`): the fixed-limit arm gets the number of RL
steps whose rollouts cost what the progressive arm's consumed, in the config's budget clock
(`workers.budget_clock`, default wall seconds), estimated from the progressive arm's final stage
(same limit); both arms' measured budgets are in the table. Writes `<out>/ablation.json`,
`<out>/ablation.md`, `<out>/ablation.png` and `<out>/ablation_rl_by_step.png`.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from klong_jax import config_util, fileio
from klong_jax.demo import ablation_report as rep_lib
from klong_jax.demo import pipeline
from klong_jax.launch import experiment as xp

ARMS = ("truncated", "split", "rl_prog", "rl_fixed", "rl_prog_no_r3")
# The issue-31 ablation: R3 on vs off was measured (docs/results.md) and costs an RL run plus
# its stage evals per seed; `--arms` adds it back.
DEFAULT_ARMS = ARMS[:4]
LABELS = {"truncated": "SFT, truncated (no splitting)", "split": "SFT, trajectory splitting",
          "rl_prog": "split SFT + progressive RL", "rl_fixed": "split SFT + fixed-limit RL",
          "rl_prog_no_r3": "split SFT + progressive RL, no routing replay"}
MISMATCH = ("logprob_gap_mean", "logprob_gap_max", "kl_max", "routing_flip")
_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Flags only when run as a program (importing this next to launch/local.py must not clash)."""
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/demo.py",
                                                     "Base demo config.")
  _FLAGS["out"] = flags.DEFINE_string("out", "runs/ablation", "Output dir (per seed and arm).")
  _FLAGS["seeds"] = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1.")
  _FLAGS["only_seeds"] = flags.DEFINE_list(
      "only_seeds", [], "Run just these of the seeds (e.g. a second process on a spare core); "
      "the table still covers every seed < --seeds whose arms have finished.")
  _FLAGS["arms"] = flags.DEFINE_list("arms", list(DEFAULT_ARMS), f"Arms to run, of {ARMS}.")
  _FLAGS["eval_episodes"] = flags.DEFINE_integer(
      "eval_episodes", 100, "Episodes per evaluated policy and task set (spread evenly over the "
      "set's tasks); 0 = the config's eval.episodes_per_task per task.")
  _FLAGS["eval_sets"] = flags.DEFINE_list("eval_sets", ["heldout", "rl"],
                                          f"Task sets each policy is evaluated on, of "
                                          f"{pipeline.EVAL_SETS}.")
  _FLAGS["eval_workers"] = flags.DEFINE_integer(
      "eval_workers", 4, "Worker processes per eval (0 = the config's eval.workers); 4 ran "
      "1.6x the episodes/min of 2 (benchmarks/eval_throughput.py).")
  _FLAGS["stage_evals"] = flags.DEFINE_bool(
      "stage_evals", True, "Evaluate progressive RL after each stage, not only at the end.")
  _FLAGS["report_only"] = flags.DEFINE_bool(
      "report_only", False, "Only rewrite the tables and plots from the finished arms and evals.")
  _FLAGS["budget"] = flags.DEFINE_enum(
      "budget", "matched", list(BUDGETS), "matched: the fixed-limit arm's RL steps match the "
      "progressive arm's rollout budget in the budget clock; steps: the same number of steps.")


BUDGETS = ("matched", "steps")


def with_evals(base: ml_collections.ConfigDict, episodes: int, sets: Sequence[str],
               workers: int = 0) -> ml_collections.ConfigDict:
  """The base config with the ablation's eval settings (a copy)."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.eval.episodes = int(episodes)
  c.eval.sets = ",".join(sets)
  if workers:
    c.eval.workers = int(workers)
  pipeline.eval_sets(c)  # Refuses unknown sets before anything runs.
  return c


def budget_clock(c: ml_collections.ConfigDict) -> str:
  """The clock stage limits are counted in (`workers.budget_clock`; wall seconds without it)."""
  return str(c.workers.get("budget_clock", "wall"))


def rollouts_per_step(c: ml_collections.ConfigDict) -> int:
  """Rollouts one RL step consumes: groups per step x group size."""
  rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
  return int(rl.rl.groups_per_step) * int(c.workers.group_size)


def stage_steps(c: ml_collections.ConfigDict) -> list[int]:
  """RL steps per stage (the last stage runs to the total)."""
  rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
  steps = [int(st.get("steps", 0) or 0) for st in rl.curriculum.stages[:-1]]
  return steps + [max(0, int(rl.train.steps) - sum(steps))]


def nominal_budget(c: ml_collections.ConfigDict) -> float:
  """The most rollout budget an RL config can use: every rollout running to its stage limit."""
  per = rollouts_per_step(c)
  return float(sum(n * per * lim for n, lim in zip(stage_steps(c), stage_limits(c), strict=True)))


def matched_steps(c: ml_collections.ConfigDict, prog_rl_dir: str | None) -> tuple[int, str]:
  """RL steps at the final limit whose rollouts cost what the progressive run's consumed.

  Measured (the progressive run's consumed budget / its final stage's mean cost per rollout,
  i.e. what a rollout at the final limit costs; ablation_report.rl_budget) when that run
  recorded costs in the clock, else nominal (every rollout to its limit). Returns (steps >= 1,
  how it was computed)."""
  per = rollouts_per_step(c)
  if prog_rl_dir and os.path.isdir(os.path.join(prog_rl_dir, "stream")):
    b = rep_lib.rl_budget(prog_rl_dir, budget_clock(c))
    if b["consumed_n"] and b["final_stage_mean"]:
      rollouts = b["consumed"] / b["final_stage_mean"]
      return max(1, round(rollouts / per)), (
          f"measured: progressive consumed {b['consumed']:.1f} {b['clock']} over "
          f"{b['consumed_n']} rollouts; a final-limit rollout costs {b['final_stage_mean']:.2f}")
  final = stage_limits(c)[-1]
  return max(1, round(nominal_budget(c) / (per * final))), (
      f"nominal: progressive limit budget {nominal_budget(c):g} / ({per} rollouts x {final:g})")


def stage_limits(c: ml_collections.ConfigDict) -> list[float]:
  """The RL stage time limits (seconds) a demo config's RL trainer runs: its config file with
  `rl.args` (rl_tiny owns the default `limits`)."""
  rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
  return [float(stage["time_limit_s"]) for stage in rl.curriculum.stages]


def arm_config(base: ml_collections.ConfigDict, arm: str, seed: int,
               fixed_steps: int = 0) -> ml_collections.ConfigDict:
  """The demo config of one arm and seed (`fixed_steps` > 0: the fixed-limit arm's RL steps)."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.seed = seed
  if arm == "truncated":
    if "data" not in c.sft.overrides:
      c.sft.overrides.data = ml_collections.ConfigDict()
    c.sft.overrides.data.truncate = True
    c.stop_after = "eval_sft"
  elif arm == "split":
    c.stop_after = "eval_sft"
  else:
    c.stop_after = "eval_rl"
    if arm == "rl_fixed":  # One stage at the final limit from the start.
      c.rl.args.limits = f"{stage_limits(c)[-1]:g}"
      if fixed_steps > 0:
        c.rl.args.steps = int(fixed_steps)
    elif arm == "rl_prog_no_r3":
      c.rl.routing_replay = False
  return c


def _share(src: str, dst: str) -> None:
  """Links a finished phase dir of another arm into this arm's workdir (skipped if present)."""
  if os.path.exists(src) and not os.path.lexists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.abspath(src), dst)


def prepare_arm(root: str, arm: str) -> str:
  """The arm's workdir, with the phases it shares with the split arm linked in."""
  wd = os.path.join(root, arm)
  split = os.path.join(root, "split")
  if arm == "split":
    return wd
  for name in ("tokenizer", "distill"):
    _share(os.path.join(split, name), os.path.join(wd, name))
  if arm.startswith("rl_"):
    for name in ("sft", "eval_sft"):
      _share(os.path.join(split, name), os.path.join(wd, name))
  return wd


def stage_end_versions(rl_dir: str) -> dict[int, int]:
  """{stage: the policy version serving when the next stage began} of every stage but the last,
  from the trainer's metrics.jsonl (a step's record holds the version it started from; with
  `publish=1` that of the first step of stage s + 1 is stage s's final params)."""
  path = os.path.join(rl_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    recs = [json.loads(ln) for ln in f if ln.strip()]
  out: dict[int, int] = {}
  prev = None
  for r in recs:
    if "loss" not in r or "stage" not in r or "policy_version" not in r:
      continue
    stage = int(r["stage"])
    if prev is not None and stage != prev:
      out[prev] = int(r["policy_version"])
    prev = stage
  return out


def eval_stages(c: ml_collections.ConfigDict, wd: str) -> dict[int, dict[str, float]]:
  """Evaluates an RL arm's policy at the end of each stage but the last (the last is eval_rl)
  on the config's task sets; returns {stage: {set: mean reward}}."""
  rl_dir = os.path.join(wd, "rl")
  toks = sorted(glob.glob(os.path.join(wd, "tokenizer", "**", "tokenizer.model"),
                          recursive=True))
  if len(toks) != 1:
    raise FileNotFoundError(f"expected one tokenizer.model under {wd}/tokenizer, found {toks}")
  sets = {"heldout": os.path.join(wd, "tasks", "heldout"), "rl": xp.rl_tasks_dir(wd)}
  res = {}
  for stage, version in sorted(stage_end_versions(rl_dir).items()):
    d = rep_lib.stage_dir(wd, stage)
    src = os.path.join(rl_dir, "policy", str(version))
    if not os.path.isdir(src):
      raise FileNotFoundError(f"{src}: stage {stage}'s final policy version is gone; the RL "
                              "run must keep its published versions for stage evals")
    link = os.path.join(d, "policy", str(version))
    if not os.path.lexists(link):
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.abspath(src), link)
    print(f"== stage {stage} (policy version {version}): {d}", flush=True)
    evs = pipeline.evaluate_sets(c, d, os.path.dirname(link), toks[0], sets)
    res[stage] = {k: v.mean for k, v in evs.items()}
  return res


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error over seeds (nan SE for one seed)."""
  n = len(values)
  if not n:
    return float("nan"), float("nan")
  m = sum(values) / n
  if n < 2:
    return m, float("nan")
  var = sum((v - m) ** 2 for v in values) / (n - 1)
  return m, math.sqrt(var / n)


def arm_reward(summary: dict[str, Any], arm: str) -> float | None:
  key = "heldout_rl" if arm.startswith("rl_") else "heldout_sft"
  v = summary.get(key)
  return None if v is None else float(v)


def table(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """Per arm: per-seed rewards, mean, SE, spread; plus split - truncated vs the seed spread."""
  rows = {}
  for arm, by_seed in results.items():
    vals = [r["reward"] for _, r in sorted(by_seed.items()) if r.get("reward") is not None]
    m, se = mean_se(vals)
    rows[arm] = {"label": LABELS[arm], "seeds": {str(s): r for s, r in sorted(by_seed.items())},
                 "rewards": vals, "mean": m, "se": se,
                 "spread": (max(vals) - min(vals)) if vals else float("nan")}
    mms = [r["rl_mismatch"] for _, r in sorted(by_seed.items()) if r.get("rl_mismatch")]
    if mms:  # Mean over seeds of each run's sampler-vs-trainer figures.
      rows[arm]["rl_mismatch"] = {k: mean_se([float(m[k]) for m in mms
                                              if not math.isnan(float(m.get(k, math.nan)))])[0]
                                  for k in MISMATCH}
  out: dict[str, Any] = {"arms": rows}
  if "split" in rows and "truncated" in rows:
    gain = rows["split"]["mean"] - rows["truncated"]["mean"]
    spread = max(rows["split"]["spread"], rows["truncated"]["spread"])
    out["split_minus_truncated"] = gain
    out["seed_spread"] = spread
    out["split_beats_truncated_by_more_than_spread"] = bool(gain > spread)
  if "rl_prog" in rows and "rl_prog_no_r3" in rows:
    out["r3_minus_no_r3"] = rows["rl_prog"]["mean"] - rows["rl_prog_no_r3"]["mean"]
  return out


def markdown(t: dict[str, Any], note: str = "") -> str:
  lines = ["| arm | held-out reward (mean ± SE) | per seed | timed out (RL, per stage) |",
           "|---|---|---|---|"]
  for r in t["arms"].values():
    per = ", ".join(f"{v:.3f}" for v in r["rewards"])
    tl = "; ".join(
        f"s{s}: " + "/".join(f"{e['time_limit_share']:.0%}" for e in rec.get("rl_endings", {})
                             .values())
        for s, rec in r["seeds"].items() if rec.get("rl_endings")) or "-"
    lines.append(f"| {r['label']} | {r['mean']:.3f} ± {r['se']:.3f} | {per} | {tl} |")
  if "split_minus_truncated" in t:
    lines.append("")
    lines.append(f"Split - truncated: {t['split_minus_truncated']:+.3f}; largest seed spread "
                 f"(max - min) of the two arms: {t['seed_spread']:.3f}; "
                 "split wins by more than the spread: "
                 f"{t['split_beats_truncated_by_more_than_spread']}.")
  mm = [(r["label"], r["rl_mismatch"]) for r in t["arms"].values() if r.get("rl_mismatch")]
  if mm:
    lines += ["", "Sampler vs trainer during RL (mean over seeds; |dlogp| per loss token, first "
              "update of each step; routing flips: recorded selections the trainer would change):",
              "", "| arm | mean abs dlogp | max abs dlogp | KL max | routing flips |",
              "|---|---|---|---|---|"]
    lines += [f"| {label} | {m['logprob_gap_mean']:.4f} | {m['logprob_gap_max']:.2f} | "
              f"{m['kl_max']:.2f} | {m['routing_flip']:.1%} |" for label, m in mm]
  if "r3_minus_no_r3" in t:
    lines += ["", f"R3 on - off (held-out reward): {t['r3_minus_no_r3']:+.3f}."]
  if note:
    lines += ["", note]
  return "\n".join(lines) + "\n"


def plot(t: dict[str, Any], path: str) -> str:
  """Bar chart of mean held-out reward per arm with SE error bars."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  arms = list(t["arms"])
  means = [t["arms"][a]["mean"] for a in arms]
  ses = [0.0 if math.isnan(t["arms"][a]["se"]) else t["arms"][a]["se"] for a in arms]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.bar(range(len(arms)), means, yerr=ses, capsize=4, color="#4c72b0")
  for i, a in enumerate(arms):
    ax.scatter([i] * len(t["arms"][a]["rewards"]), t["arms"][a]["rewards"], color="k", s=10)
  ax.set_xticks(range(len(arms)), [LABELS[a].replace(", ", "\n") for a in arms], fontsize=7)
  ax.set_ylabel("held-out reward")
  ax.set_title("KLong ablation on the long-horizon suite (mean ± SE over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _finished(wd: str, arm: str) -> dict[str, Any] | None:
  """The summary of an arm another process finished (None if it has not)."""
  path = os.path.join(wd, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    res = json.load(f)
  return res if arm_reward(res, arm) is not None else None


def collect(out: str, seeds: int, arms: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
  """Per arm and seed, the finished runs' rewards and details (from their summary.json)."""
  results: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
  for seed in range(seeds):
    for arm in arms:
      wd = os.path.join(out, f"seed{seed}", arm)
      res = _finished(wd, arm)
      if res is not None:
        results[arm][seed] = {"reward": arm_reward(res, arm), "workdir": wd,
                              "phases_s": res.get("phases_first_s") or res.get("phases_s"),
                              "rl_endings": res.get("rl_endings"),
                              "rl_mismatch": res.get("rl_mismatch"),
                              "chunks": res.get("distill")}
  return results


def run(base: ml_collections.ConfigDict, out: str, seeds: int, arms: Sequence[str],
        only_seeds: Sequence[int] = (), stage_evals: bool = False,
        budget: str = "steps") -> dict[str, Any]:
  """Runs every (seed, arm) not yet finished (of `only_seeds` if given), then writes the table.

  The table covers every (seed, arm) finished by then, in this process or another.
  """
  if budget not in BUDGETS:
    raise ValueError(f"budget {budget!r}: choose from {BUDGETS}")
  bad = [a for a in arms if a not in ARMS]
  if bad:
    raise ValueError(f"unknown ablation arms {bad}; choose from {ARMS}")
  order = [a for a in ARMS if a in arms and a != "split"]
  order = (["split"] if "split" in arms else []) + order
  if any(a != "split" for a in order) and "split" not in order:
    order.insert(0, "split")  # The others share its distillation (and RL its checkpoint).
  for seed in range(seeds):
    if only_seeds and seed not in only_seeds:
      continue
    root = os.path.join(out, f"seed{seed}")
    for arm in order:
      wd = prepare_arm(root, arm)
      fixed = 0
      if arm == "rl_fixed" and budget == "matched":
        fixed, how = matched_steps(base, os.path.join(root, "rl_prog", "rl"))
        print(f"== rl_fixed: {fixed} RL steps ({how})", flush=True)
      print(f"== ablation seed {seed}, arm {arm}: {wd}", flush=True)
      pipeline.run(arm_config(base, arm, seed, fixed), wd)
      if stage_evals and arm in ("rl_prog", "rl_prog_no_r3"):
        eval_stages(arm_config(base, arm, seed), wd)
      fileio.atomic_write_json(os.path.join(out, "ablation.json"), table(collect(out, seeds, arms)))
  results = collect(out, seeds, arms)  # Read at the end: other processes' seeds count too.
  return write_report(base, out, seeds, arms, results)


def write_report(base: ml_collections.ConfigDict, out: str, seeds: int, arms: Sequence[str],
                 results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """ablation.{json,md,png} and ablation_rl_by_step.png from every finished arm and eval."""
  t = table(results)
  clock = budget_clock(base)
  t["budget"] = {"clock": clock, "nominal_progressive": nominal_budget(base), "arms": {
      arm: {str(s): rep_lib.rl_budget(os.path.join(out, f"seed{s}", arm, "rl"), clock)
            for s in range(seeds) if os.path.isdir(os.path.join(out, f"seed{s}", arm, "rl",
                                                                  "stream"))}
      for arm in arms if arm.startswith("rl_")}}
  by_set = rep_lib.collect_episodes(out, seeds, arms, pipeline.eval_sets(base))
  t["episodes"], ep_md = rep_lib.episode_report(by_set, LABELS)
  curves = {arm: rep_lib.by_step_intervals(rep_lib.rl_reward_by_step(out, seeds, arm))
            for arm in arms if arm.startswith("rl_")}
  curves = {a: c for a, c in curves.items() if len(c) > 1}
  t["rl_by_step"] = curves
  note = budget_markdown(t["budget"]) + ("\n\n" + ep_md if ep_md else "")
  fileio.atomic_write_text(os.path.join(out, "ablation.md"), markdown(t, note))
  t["plot"] = plot(t, os.path.join(out, "ablation.png"))
  if curves:
    t["plot_rl_by_step"] = rep_lib.plot_by_step(
        curves, os.path.join(out, "ablation_rl_by_step.png"), LABELS)
  fileio.atomic_write_json(os.path.join(out, "ablation.json"), t)
  return t


def budget_markdown(b: dict[str, Any]) -> str:
  """The RL arms' rollout budgets in the budget clock (consumed by the trainer / generated)."""
  rows = [f"| {LABELS[arm]} | s{s}: {r['consumed']:.0f} over {r['consumed_n']} rollouts "
          f"(generated: {r['generated']:.0f} over {r['generated_n']}) |"
          for arm, by_seed in b["arms"].items() for s, r in by_seed.items()]
  head = (f"RL rollout budget in the `{b['clock']}` clock (progressive nominal, every rollout at "
          f"its stage limit: {b['nominal_progressive']:g}):")
  return "\n".join([head, "", "| arm | consumed by the trainer (generated) |", "|---|---|",
                    *rows]) if rows else head + " no RL run finished."


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  base = with_evals(_FLAGS["config"].value, _FLAGS["eval_episodes"].value,
                    _FLAGS["eval_sets"].value, _FLAGS["eval_workers"].value)
  out, seeds, arms = (_FLAGS[k].value for k in ("out", "seeds", "arms"))
  if _FLAGS["report_only"].value:
    t = write_report(base, out, seeds, arms, collect(out, seeds, arms))
  else:
    t = run(base, out, seeds, arms, only_seeds=[int(s) for s in _FLAGS["only_seeds"].value],
            stage_evals=_FLAGS["stage_evals"].value, budget=_FLAGS["budget"].value)
  print(markdown(t))


if __name__ == "__main__":
  _define_flags()
  app.run(main)

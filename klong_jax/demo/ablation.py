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
finished are skipped on a re-run, so an interrupted ablation resumes). Writes
`<out>/ablation.json`, `<out>/ablation.md` and `<out>/ablation.png`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from klong_jax import config_util, fileio
from klong_jax.demo import pipeline

ARMS = ("truncated", "split", "rl_prog", "rl_fixed", "rl_prog_no_r3")
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
  _FLAGS["arms"] = flags.DEFINE_list("arms", list(ARMS), f"Arms to run, of {ARMS}.")


def stage_limits(c: ml_collections.ConfigDict) -> list[float]:
  """The RL stage time limits (seconds) a demo config's RL trainer runs: its config file with
  `rl.args` (rl_tiny owns the default `limits`)."""
  rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
  return [float(stage["time_limit_s"]) for stage in rl.curriculum.stages]


def arm_config(base: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
  """The demo config of one arm and seed."""
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
        only_seeds: Sequence[int] = ()) -> dict[str, Any]:
  """Runs every (seed, arm) not yet finished (of `only_seeds` if given), then writes the table.

  The table covers every (seed, arm) finished by then, in this process or another.
  """
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
      print(f"== ablation seed {seed}, arm {arm}: {wd}", flush=True)
      pipeline.run(arm_config(base, arm, seed), wd)
      fileio.atomic_write_json(os.path.join(out, "ablation.json"), table(collect(out, seeds, arms)))
  results = collect(out, seeds, arms)  # Read at the end: other processes' seeds count too.
  t = table(results)
  fileio.atomic_write_text(os.path.join(out, "ablation.md"), markdown(t))
  t["plot"] = plot(t, os.path.join(out, "ablation.png"))
  fileio.atomic_write_json(os.path.join(out, "ablation.json"), t)
  return t


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  t = run(*(_FLAGS[k].value for k in ("config", "out", "seeds", "arms")),
          only_seeds=[int(s) for s in _FLAGS["only_seeds"].value])
  print(markdown(t))


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""The ablation's arm configs and table (the runs themselves are the demo's, tested there)."""

import math
import os

import pytest

from configs import demo as demo_config
from klong_jax.demo import ablation


def test_arm_configs_differ_only_where_the_ablation_says():
  base = demo_config.get_config("")
  trunc = ablation.arm_config(base, "truncated", 2)
  split = ablation.arm_config(base, "split", 2)
  fixed = ablation.arm_config(base, "rl_fixed", 2)
  prog = ablation.arm_config(base, "rl_prog", 2)
  assert trunc.seed == split.seed == 2 and trunc.sft.overrides.data.truncate is True
  assert "truncate" not in split.sft.overrides.data and split.stop_after == "eval_sft"
  limits = ablation.stage_limits(base)
  assert len(limits) > 1 and ablation.stage_limits(prog) == limits
  assert ablation.stage_limits(fixed) == limits[-1:]  # the final limit from the start
  assert fixed.rl.args.to_dict() == {**base.rl.args.to_dict(), "limits": f"{limits[-1]:g}"}
  no_r3 = ablation.arm_config(base, "rl_prog_no_r3", 2)
  assert base.rl.routing_replay is True and prog.rl.routing_replay is True
  assert no_r3.rl.routing_replay is False
  assert ablation.stage_limits(no_r3) == limits and no_r3.stop_after == prog.stop_after
  no_r3.rl.routing_replay = True
  assert no_r3.to_dict() == prog.to_dict()  # R3 is the only difference
  assert base.to_dict() == demo_config.get_config("").to_dict()  # arms copy, never edit, base


def test_table_reports_mean_se_and_the_spread_check():
  res = {"truncated": {0: {"reward": 0.2}, 1: {"reward": 0.3}, 2: {"reward": 0.25}},
         "split": {0: {"reward": 0.5}, 1: {"reward": 0.45}, 2: {"reward": 0.55}}}
  t = ablation.table(res)
  assert math.isclose(t["arms"]["split"]["mean"], 0.5)
  assert math.isclose(t["arms"]["truncated"]["se"], 0.05 / math.sqrt(3), rel_tol=1e-6)
  assert math.isclose(t["split_minus_truncated"], 0.25) and math.isclose(t["seed_spread"], 0.1)
  assert t["split_beats_truncated_by_more_than_spread"]
  res["split"][1]["reward"] = 0.2  # a seed that loses: the claim must fail, not be tuned
  assert not ablation.table(res)["split_beats_truncated_by_more_than_spread"]
  assert "± " in ablation.markdown(t)


def test_table_compares_routing_replay_on_and_off():
  def rec(r, flip=None):
    mm = {"logprob_gap_mean": 0.01, "logprob_gap_max": 1.0, "kl_max": 2.0,
          "routing_flip": float("nan") if flip is None else flip}
    return {"reward": r, "rl_mismatch": mm}
  res = {"rl_prog": {0: rec(0.5, 0.2), 1: rec(0.4, 0.4)},
         "rl_prog_no_r3": {0: rec(0.3), 1: rec(0.4)}}
  t = ablation.table(res)
  assert math.isclose(t["r3_minus_no_r3"], 0.1)
  assert math.isclose(t["arms"]["rl_prog"]["rl_mismatch"]["routing_flip"], 0.3)
  assert math.isnan(t["arms"]["rl_prog_no_r3"]["rl_mismatch"]["routing_flip"])
  md = ablation.markdown(t)
  assert "routing flips" in md and "R3 on - off (held-out reward): +0.100" in md


@pytest.mark.subprocess
def test_ablation_and_demo_run_as_programs():
  """Each entry point defines its flags only as a program: importing demo must not clash."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  for mod in ("klong_jax.demo.ablation", "klong_jax.demo"):
    r = subprocess.run([sys.executable, "-m", mod, "--helpfull"], capture_output=True,
                       text=True, timeout=120, check=False)
    # absl's --helpfull exits 1; a flag clash exits 1 too, with a traceback and no help text.
    assert "--config" in r.stdout and "Traceback" not in r.stderr, (mod, r.stderr[-2000:])


def test_only_seeds_runs_its_seeds_and_tables_the_others_finished(tmp_path, monkeypatch):
  """A second process can take one seed: each runs only its own, the table covers both."""
  import json  # noqa: PLC0415
  ran = []

  def fake_run(c, wd):
    ran.append((c.seed, os.path.basename(wd)))
    res = {"heldout_sft": 0.5 if "split" in wd else 0.25}
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "summary.json"), "w", encoding="utf-8") as f:
      f.write(json.dumps(res))
    return res

  monkeypatch.setattr(ablation.pipeline, "run", fake_run)
  base = demo_config.get_config()
  t = ablation.run(base, str(tmp_path / "abl"), seeds=2, arms=["split", "truncated"],
                   only_seeds=[1])
  assert ran == [(1, "split"), (1, "truncated")]  # seed 0 unfinished: neither run nor tabled
  assert t["arms"]["split"]["rewards"] == [0.5]
  assert list(t["arms"]["split"]["seeds"]) == ["1"]
  ran.clear()
  t = ablation.run(base, str(tmp_path / "abl"), seeds=2, arms=["split", "truncated"],
                   only_seeds=[0])
  assert ran == [(0, "split"), (0, "truncated")]
  assert t["arms"]["split"]["rewards"] == [0.5, 0.5]
  assert t["arms"]["truncated"]["rewards"] == [0.25, 0.25]


def _write_stream(stream, trajs, name="w"):
  from klong_jax.data import shards  # noqa: PLC0415
  shards.write_shard(os.path.join(stream, "0", f"{name}.array_record"),
                     [t.to_bytes() for t in trajs])


def _traj(key, task, reward, version=0, stage=0, cost=None):
  from tests.rl.fakes import make_trajectory  # noqa: PLC0415
  t = make_trajectory(key, task + "-g", reward, version=version, stage=stage)
  t.task_id = task
  t.timings = {} if cost is None else {"agent_s": cost, "token_clock_s": cost}  # both clocks
  return t


def test_eval_settings_and_sets():
  base = demo_config.get_config("")
  assert ablation.pipeline.eval_sets(base) == ["heldout"]  # make demo: held-out only
  c = ablation.with_evals(base, 100, ["heldout", "rl"], workers=4)
  assert (c.eval.episodes, c.eval.sets, c.eval.workers) == (100, "heldout,rl", 4)
  assert base.eval.episodes == 0  # a copy
  with pytest.raises(ValueError, match="eval.sets"):
    ablation.with_evals(base, 100, ["heldout", "train"])


def test_episodes_per_task_spreads_the_episode_count(tmp_path):
  c = demo_config.get_config("")
  tasks = tmp_path / "tasks"
  for i in range(20):
    (tasks / f"t{i}").mkdir(parents=True)
  assert ablation.pipeline.episodes_per_task(c, str(tasks)) == c.eval.episodes_per_task
  c.eval.episodes = 100
  assert ablation.pipeline.episodes_per_task(c, str(tasks)) == 5
  c.eval.episodes = 101  # rounded up: every task gets the same count
  assert ablation.pipeline.episodes_per_task(c, str(tasks)) == 6
  assert ablation.pipeline.eval_dir("/r/eval_sft", "heldout") == "/r/eval_sft"
  assert ablation.pipeline.eval_dir("/r/eval_sft", "rl") == "/r/eval_sft/on_rl"


def test_budget_matching_nominal_and_measured(tmp_path):
  import json  # noqa: PLC0415
  base = demo_config.get_config("")
  assert ablation.budget_clock(base) == "tokens"  # configs/demo.py: the deterministic clock
  per = ablation.rollouts_per_step(base)
  assert per == base.rl.args.groups * base.workers.group_size
  limits, steps = ablation.stage_limits(base), ablation.stage_steps(base)
  assert sum(steps) == base.rl.args.steps and len(steps) == len(limits)
  nominal = sum(n * per * lim for n, lim in zip(steps, limits, strict=True))
  assert ablation.nominal_budget(base) == nominal
  n, how = ablation.matched_steps(base, None)
  assert n == round(nominal / (per * limits[-1])) and how.startswith("nominal")
  # Measured: 16 rollouts costing 10 each in stage 0, 17 costing 40 in the last (one unconsumed).
  rl = tmp_path / "rl"
  trajs = ([_traj(f"a-s0-r0-{i}", "arith-sweep1", 0.5, stage=0, cost=10.0) for i in range(16)]
           + [_traj(f"a-s2-r0-{i}", "arith-sweep1", 0.5, stage=2, cost=40.0) for i in range(16)]
           + [_traj("a-s2-r1-0", "arith-sweep1", 0.5, stage=2, cost=40.0)])  # not consumed
  _write_stream(str(rl / "stream"), trajs)
  (rl / "consumed.jsonl").write_text(json.dumps({"step": 1, "ids": [t.id for t in trajs[:-1]]})
                                     + "\n")
  b = ablation.rep_lib.rl_budget(str(rl), "wall")
  assert (b["consumed"], b["consumed_n"], b["generated"], b["generated_n"]) == (800.0, 32, 840.0,
                                                                                 33)
  assert b["final_stage_mean"] == 40.0 and b["by_stage"]["0"] == {"sum": 160.0, "n": 16}
  n, how = ablation.matched_steps(base, str(rl))
  assert n == round(20 / per) and how.startswith("measured")  # 800 consumed / 40 = 20 rollouts
  fixed = ablation.arm_config(base, "rl_fixed", 0, fixed_steps=3)
  assert fixed.rl.args.steps == 3 and ablation.stage_limits(fixed) == limits[-1:]
  assert ablation.rep_lib.rl_budget(str(rl), "other")["missing_cost"] == 33  # not recorded


def test_stage_end_versions(tmp_path):
  import json  # noqa: PLC0415
  recs = [{"step": 1, "loss": 0.1, "stage": 0, "policy_version": 0},
          {"step": 1, "stage": "stage 1: time limit 30s"},  # a text event, skipped
          {"step": 2, "loss": 0.1, "stage": 0, "policy_version": 1},
          {"step": 3, "loss": 0.1, "stage": 1, "policy_version": 2},
          {"step": 4, "loss": 0.1, "stage": 2, "policy_version": 3},
          {"step": 5, "loss": 0.1, "stage": 2, "policy_version": 4}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  assert ablation.stage_end_versions(str(tmp_path)) == {0: 2, 1: 3}
  assert ablation.stage_end_versions(str(tmp_path / "none")) == {}


def test_write_report_pairs_arms_per_family_and_plots_by_step(tmp_path):
  """Finished evals of three points (split, progressive after stage 0, progressive) on two
  task sets over two seeds: paired tables per set, the RL by-step curves and plot."""
  import json  # noqa: PLC0415
  out = tmp_path / "abl"
  base = ablation.with_evals(demo_config.get_config(""), 4, ["heldout", "rl"])
  shift = {"split": 0.0, "rl_prog@stage0": 0.1, "rl_prog": 0.2}
  for seed in range(2):
    for point, d in (("split", "split/eval_sft"), ("rl_prog@stage0", "rl_prog/eval_stage0"),
                     ("rl_prog", "rl_prog/eval_rl")):
      for s, tasks in (("heldout", ["arith-sweep6", "fib-sweep6"]),
                       ("rl", ["arith-sweep4", "fib-sweep4"])):
        phase = str(out / f"seed{seed}" / d)
        ev = ablation.pipeline.eval_dir(phase, s)
        trajs = [_traj(f"{t}-s0-r0-{i}", t, min(1.0, 0.3 + 0.1 * i + shift[point] + 0.05 * seed))
                 for t in tasks for i in range(2)]
        _write_stream(os.path.join(ev, "stream"), trajs)
        open(os.path.join(ev, "done"), "w").close()
    with open(out / f"seed{seed}" / "split" / "summary.json", "w") as f:
      json.dump({"heldout_sft": 0.4}, f)
    with open(out / f"seed{seed}" / "rl_prog" / "summary.json", "w") as f:
      json.dump({"heldout_rl": 0.6}, f)
    _write_stream(str(out / f"seed{seed}" / "rl_prog" / "rl" / "stream"),
                  [_traj(f"{t}-s0-r{v}-0", t, 0.25 * v, version=v, cost=5.0)
                   for t in ("arith-sweep4", "fib-sweep4") for v in range(3)])
  arms = ["split", "rl_prog"]
  t = ablation.write_report(base, str(out), 2, arms, ablation.collect(str(out), 2, arms))
  held = t["episodes"]["heldout"]
  assert list(held["arms"]) == ["split", "rl_prog@stage0", "rl_prog"]
  assert held["arms"]["split"]["episodes"] == 8 and held["arms"]["split"]["seeds"] == [0, 1]
  d = held["vs_baseline"]["rl_prog"]["reward"]
  assert d["n_pairs"] == 8 and d["paired_t"]["mean"] == pytest.approx(0.2)
  assert d["paired_t"]["hi"] - d["paired_t"]["lo"] < 1e-9  # a constant shift: no spread
  assert "rl" in t["episodes"] and t["budget"]["arms"]["rl_prog"]["0"]["consumed"] == 30.0
  curve = t["rl_by_step"]["rl_prog"]
  assert [p["step"] for p in curve["arith"]] == [0, 1, 2]
  assert curve["all"][2]["mean"] == 0.5 and curve["all"][2]["n"] == 4
  assert os.path.exists(t["plot_rl_by_step"])
  md = (out / "ablation.md").read_text()
  assert "held-out tasks (heldout)" in md and "RL tasks (rl)" in md
  assert "split SFT + progressive RL, after stage0" in md and "paired diff" in md
  assert "RL rollout budget in the `tokens` clock" in md and "s1: 30 over 6 rollouts" in md

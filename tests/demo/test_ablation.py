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

"""Episode reports: sweep failure modes, per-family and per-mode tables, paired arm diffs."""

import json
import os

import pytest

from klong_jax.data import shards
from klong_jax.eval import diagnose, episodes
from klong_jax.factory import sweep_teacher
from tests.rl.fakes import make_trajectory

PAPER = ("The released `solution.py` implements `arith_series` (it returns a dict). Run each "
         "setting K = 1..4 with `python3 run.py K`.")
SUB = "/workspace/submission"


def _sweep(tid, key, reward, cmds, outputs, status="completed"):
  t = make_trajectory(key, key.rsplit("-", 3)[0] + "-g", reward, version=0, status=status)
  t.task_id = tid
  t.messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": PAPER}]
  for i, (cmd, out) in enumerate(zip(cmds, outputs, strict=True)):
    t.messages += [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": f"c{i}", "type": "function",
            "function": {"name": "bash", "arguments": json.dumps({"cmd": cmd})}}]},
        {"role": "tool", "content": out, "tool_call_id": f"c{i}"}]
  return t


def _runs(ks):
  return ([sweep_teacher.run_script(SUB, k) for k in ks],
          [f"run {k}: {{'total': 1}}\n{i + 1}/4 runs done" for i, k in enumerate(ks)])


def test_classify_sweep_tags():
  cmds, outs = _runs([1, 2, 3, 4])
  full = _sweep("arith-sweep1", "arith-sweep1-s0-r0-0", 1.0,
                cmds + [sweep_teacher.reproduce_script(SUB)], outs + ["table: 4/4 runs"])
  assert diagnose.classify(full, None)["tags"] == []
  c, o = _runs([1, 3, 3])
  bad = _sweep("arith-sweep1", "arith-sweep1-s0-r0-1", 0.3,
               c + [sweep_teacher.bad_run_script(SUB, 4)],
               o + ["usage: python3 run.py K (K = 1..4) | python3 run.py table"],
               status="agent_timeout")
  got = diagnose.classify(bad, None)
  assert got["tags"] == ["time_limit", "bad_command", "skipped_run", "repeated_run",
                         "incomplete_sweep", "no_reproduce"]
  assert (got["runs_logged"], got["runs"]) == (2, 4)
  assert set(got["tags"]) <= set(diagnose.SWEEP_TAGS)
  c, o = _runs([1, 2])
  assert diagnose.classify(_sweep("arith-sweep1", "k", 0.2, c, o, "step_limit"), None)["tags"] \
      == ["step_limit", "incomplete_sweep", "no_reproduce"]


def _write(stream, trajs):
  shards.write_shard(os.path.join(stream, "0", "w.array_record"), [t.to_bytes() for t in trajs])


def _arm(tmp_path, name, rewards):
  """An eval stream: tasks arith-sweep1 and fib-sweep1, 3 episodes each (rewards in order)."""
  trajs = []
  for i, r in enumerate(rewards):
    tid = "arith-sweep1" if i < 3 else "fib-sweep1"
    ks = [1, 2, 3, 4] if r == 1.0 else [1, 2]
    c, o = _runs(ks)
    if r == 1.0:
      c, o = c + [sweep_teacher.reproduce_script(SUB)], o + ["table: 4/4 runs"]
    trajs.append(_sweep(tid, f"{tid}-s0-r0-{i % 3}", r, c, o))
  path = str(tmp_path / name / "stream")
  _write(path, trajs)
  return path


def test_report_per_family_mode_and_paired(tmp_path):
  base = episodes.read_episodes(_arm(tmp_path, "a", [1.0, 0.5, 0.5, 0.2, 0.2, 1.0]), seed=0)
  other = episodes.read_episodes(_arm(tmp_path, "b", [1.0, 1.0, 0.5, 0.2, 1.0, 1.0]), seed=0)
  assert {e.family for e in base} == {"arith", "fib"}
  assert base[0].key == "arith-sweep1-s0-r0-0" and base[0].pair_key == (0, base[0].key)
  rep = episodes.report({"split": base, "rl": other}, baseline="split")
  a = rep["arms"]["split"]
  assert a["episodes"] == 6 and a["reward"]["mean"] == pytest.approx(3.4 / 6)
  assert a["families"]["arith"]["mean"] == pytest.approx(2.0 / 3)
  assert a["families"]["fib"]["mean"] == pytest.approx(1.4 / 3)
  assert a["modes"]["incomplete_sweep"]["rate"]["mean"] == pytest.approx(4 / 6)
  assert a["clean_rate"]["mean"] == pytest.approx(2 / 6)
  d = rep["vs_baseline"]["rl"]
  assert d["reward"]["n_pairs"] == 6
  assert d["reward"]["paired_t"]["mean"] == pytest.approx((0.5 + 0.8) / 6)
  assert d["families"]["fib"]["paired_t"]["mean"] == pytest.approx(0.8 / 3)
  assert d["modes"]["incomplete_sweep"]["paired_t"]["mean"] == pytest.approx(-2 / 6)
  md = episodes.markdown(rep, {"split": "split SFT"}, title="held-out")
  assert "### held-out" in md and "| split SFT | 6 |" in md and "incomplete_sweep" in md
  assert "Difference to split SFT" in md and "| fib |" in md
  with pytest.raises(ValueError, match="baseline arm"):
    episodes.report({"a": base}, baseline="nope")


def test_seeds_pair_within_seed_and_duplicates_refused(tmp_path):
  s0 = episodes.read_episodes(_arm(tmp_path, "s0", [1.0, 0.5, 0.5, 0.2, 0.2, 1.0]), seed=0)
  s1 = episodes.read_episodes(_arm(tmp_path, "s1", [0.5, 0.5, 0.5, 0.2, 1.0, 1.0]), seed=1)
  rep = episodes.report({"x": s0 + s1, "y": s1 + s0}, baseline="x")
  assert rep["arms"]["x"]["reward"]["over_seeds"]["n"] == 2
  assert "bootstrap over 2 clusters" == rep["arms"]["x"]["reward"]["bootstrap"]["method"]
  assert rep["vs_baseline"]["y"]["reward"]["paired_t"]["mean"] == 0.0  # Same episodes, same keys.
  path = _arm(tmp_path, "dup", [1.0] * 6)
  _write(os.path.join(path, "again"), [_sweep("arith-sweep1", "arith-sweep1-s0-r0-0", 1.0,
                                              *_runs([1]))])
  with pytest.raises(ValueError, match="more than once"):
    episodes.read_episodes(path)

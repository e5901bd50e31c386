"""Token-clock calibration (agent/calibrate.py): synthetic trajectories made with known rates and
noise give the rates back; the scaffold's per-call records feed it; bad streams are named."""

import dataclasses
import json
import os

import numpy as np
import pytest

from klong_jax.agent import calibrate as cal
from klong_jax.data import shards
from tests.rl.fakes import make_trajectory

TRUE = {"prefill": 4e-4, "decode": 0.012,
        "tools": {"bash": 0.9, "python": 0.6, "read_file_chunk": 0.05, "submit": 0.02}}
MIX = ["bash", "python", "read_file_chunk"]


def _synthetic(n: int, seed: int, noise: float = 0.05, overhead_s: float = 0.0,
               per_call: bool = True):
  """`n` trajectories whose calls take the TRUE rates' time x lognormal noise: per episode a
  different verbosity, prompt growth and tool mix, so the episode-level terms are not collinear."""
  rng = np.random.default_rng(seed)
  out = []
  for e in range(n):
    steps = int(rng.integers(4, 30))
    verbose, growth = rng.uniform(0.3, 2.0), rng.uniform(0.2, 3.0)
    mix = rng.dirichlet(np.ones(len(MIX)))
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    wall, pre_tot, dec_tot = 0.0, 0, 0
    for k in range(steps):
      pre = int(400 if k == 0 else rng.integers(20, 200) * growth)
      dec = int(rng.integers(10, 160) * verbose)
      lat = (pre * TRUE["prefill"] + dec * TRUE["decode"]) * rng.lognormal(0, noise)
      name = "submit" if k == steps - 1 else MIX[int(rng.choice(len(MIX), p=mix))]
      tw = TRUE["tools"][name] * rng.lognormal(0, noise)
      meta = {"step": k + 1, "finish_reason": "tool_calls"}
      tmeta = {}
      if per_call:
        meta.update(prefill_tokens=pre, completion_tokens=dec, prompt_tokens=pre,
                    latency_s=lat)
        tmeta = {"meta": {"wall_s": tw, "cpu_s": None}}
      msgs += [{"role": "assistant", "content": "", "meta": meta,
                "tool_calls": [{"id": f"c{k}", "function": {"name": name}}]},
               {"role": "tool", "tool_call_id": f"c{k}", "name": name, "content": "",
                **tmeta}]
      wall += lat + tw + overhead_s
      pre_tot, dec_tot = pre_tot + pre, dec_tot + dec
    budget = {"clock": "tokens", "wall": {"total_s": wall + 1.5, "retry_s": 1.5},
              "tokens": {"prefill_tokens": pre_tot, "decode_tokens": dec_tot,
                         "tool_calls": steps}}
    t = make_trajectory(f"g{e}-0", f"g{e}", 0.5, 0, seed=e,
                        metadata={"budget": budget})
    out.append(dataclasses.replace(t, messages=msgs, timings={"token_clock_s": 0.5 * wall}))
  return out


def _episodes(trajs):
  return [cal.episode_of(t) for t in trajs]


def test_calls_fit_recovers_the_rates():
  f = cal.fit(_episodes(_synthetic(60, 0)), "auto", min_tool_calls=20)
  assert f.mode == "calls"
  assert f.prefill_s_per_token == pytest.approx(TRUE["prefill"], rel=0.05)
  assert f.decode_s_per_token == pytest.approx(TRUE["decode"], rel=0.05)
  for name in MIX:
    assert f.tool_costs[name] == pytest.approx(TRUE["tools"][name], rel=0.05)
  # submit (one call per episode, < min_tool_calls when few episodes) shares `default`.
  assert "submit" in f.tool_costs or f.tool_costs["default"] > 0
  assert f.quality["r2"] > 0.99 and f.quality["rel_err_median"] < 0.03
  # The recorded clock (half the wall time here) is reported next to the fit.
  assert f.recorded["ratio_total"] == pytest.approx(0.5)


def test_episode_fit_recovers_the_rates_without_per_call_records():
  eps = _episodes(_synthetic(200, 1, per_call=False))
  assert not any(e.has_calls for e in eps)
  f = cal.fit(eps, "auto", min_tool_calls=20)
  assert f.mode == "episodes"
  assert f.prefill_s_per_token == pytest.approx(TRUE["prefill"], rel=0.15)
  assert f.decode_s_per_token == pytest.approx(TRUE["decode"], rel=0.15)
  for name in ("bash", "python"):
    assert f.tool_costs[name] == pytest.approx(TRUE["tools"][name], rel=0.15)
  assert f.quality["r2"] > 0.98
  with pytest.raises(cal.CalibrationError, match="lack per-call records"):
    cal.fit(eps, "calls")


def test_scaffold_overhead_shows_as_the_unexplained_share():
  # Wall time outside the calls (0.2 s per action) is not in the per-call fit's rates...
  calls = cal.fit(_episodes(_synthetic(60, 2, overhead_s=0.2)), "calls")
  assert calls.decode_s_per_token == pytest.approx(TRUE["decode"], rel=0.05)
  assert calls.quality["ratio_total"] < 0.95
  # ...while the episode fit spreads it over the terms so the episode totals match.
  eps = cal.fit(_episodes(_synthetic(60, 2, overhead_s=0.2)), "episodes")
  assert eps.quality["ratio_total"] == pytest.approx(1.0, abs=0.02)


def test_nnls_matches_scipy_and_keeps_rates_non_negative():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 5))
  b = a @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + rng.normal(scale=0.1, size=40)
  x = cal.nnls(a, b)
  assert (x >= 0).all() and x[1] == 0.0  # unconstrained least squares would go negative
  optimize = pytest.importorskip("scipy.optimize")
  ref, _ = optimize.nnls(a, b)
  np.testing.assert_allclose(x, ref, atol=1e-8)
  for seed in range(5):
    r = np.random.default_rng(seed + 1)
    a, b = r.uniform(size=(30, 6)), r.normal(size=30)
    np.testing.assert_allclose(cal.nnls(a, b), optimize.nnls(a, b)[0], atol=1e-8)


def _write(stream, trajs, stage=0):
  path = os.path.join(stream, str(stage), "w0-0.array_record")
  shards.write_shard(path, [t.to_bytes() for t in trajs])


def test_cli_prints_overrides_and_writes_json(tmp_path, capsys):
  stream = str(tmp_path / "stream")
  _write(stream, _synthetic(40, 3))
  out = tmp_path / "rates.json"
  cal.main([f"--stream={stream}", f"--out={out}"])
  text = capsys.readouterr().out
  assert "--config.workers.prefill_s_per_token=" in text and "--decode_s_per_token=" in text
  assert "R^2" in text and "recorded clock vs wall" in text
  got = json.loads(out.read_text())
  assert got["mode"] == "calls" and got["episodes"] == 40
  assert got["decode_s_per_token"] == pytest.approx(TRUE["decode"], rel=0.05)
  assert any(o.startswith("--config.workers.tool_costs=bash=") for o in got["overrides"])


def test_bad_streams_are_named_with_the_fix(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(SystemExit, match=f"calibrate: {missing}.*rollout stream"):
    cal.main([f"--stream={missing}"])
  empty = tmp_path / "empty"
  (empty / "0").mkdir(parents=True)
  with pytest.raises(SystemExit, match=f"{empty}: no trajectories"):
    cal.main([f"--stream={empty}"])
  old = str(tmp_path / "old")  # trajectories from before the budget clock, and infra errors
  _write(old, [make_trajectory("g-0", "g", 0.5, 0), make_trajectory("g-1", "g", None, 0)])
  with pytest.raises(SystemExit, match=r"none of its 2 trajectories records metadata.budget.*"
                                       r"Roll out again"):
    cal.main([f"--stream={old}"])
  few = str(tmp_path / "few")
  _write(few, _synthetic(2, 4, per_call=False))
  with pytest.raises(SystemExit, match=">= 3 episodes"):
    cal.main([f"--stream={few}"])


def test_scaffold_records_what_the_fit_needs():
  # A scripted episode (test_budget's) with 0.7 s of injected load per command: each call's
  # record sums to the token clock's counts, and tool wall times are on the wall clock's source.
  from types import SimpleNamespace

  from tests.agent.test_budget import STEPS, _episode
  ep = _episode("tokens", 100.0, tool_delay_s=0.7, model_delay_s=0.0)
  traj = SimpleNamespace(id="x", status=ep.status, messages=ep.messages,
                         metadata={"budget": ep.clock},
                         timings={"token_clock_s": ep.clock["tokens"]["elapsed_s"]})
  e = cal.episode_of(traj)
  assert e.has_calls and len(e.calls) == STEPS + 1 and dict(e.tools) == {"bash": STEPS,
                                                                         "submit": 1}
  tok = ep.clock["tokens"]
  assert sum(c[0] for c in e.calls) == tok["prefill_tokens"] > 0
  assert sum(c[1] for c in e.calls) == tok["decode_tokens"] > 0
  assert all(c[2] > 0 for c in e.calls)
  assert all(w >= 0.7 for n, w, _ in e.tool_calls if n == "bash")
  wall = ep.clock["wall"]
  assert e.wall_s == pytest.approx(wall["total_s"] - wall["retry_s"])
  assert e.wall_s >= sum(c[2] for c in e.calls) + sum(w for _, w, _ in e.tool_calls) - 1e-6


def test_trim_leaves_out_a_cold_servers_compile_stalls():
  trajs = _synthetic(60, 5)
  for t in trajs[:4]:  # the first call of each of 4 workers' first episodes: a 45 s compile
    first = next(m for m in t.messages if m["role"] == "assistant")
    first["meta"]["latency_s"] += 45.0
    t.metadata["budget"]["wall"]["total_s"] += 45.0
  eps = _episodes(trajs)
  raw = cal.fit(eps, "calls", trim=0.0)
  assert raw.prefill_s_per_token > 1.5 * TRUE["prefill"]  # the 400-token first prompts
  f = cal.fit(eps, "calls", trim=0.02)
  clean = cal.fit(_episodes(_synthetic(60, 5)), "calls", trim=0.02)  # the same, no stalls
  assert f.quality["trimmed"] == clean.quality["trimmed"] >= 4
  assert f.prefill_s_per_token == pytest.approx(clean.prefill_s_per_token, rel=0.05)
  assert f.decode_s_per_token == pytest.approx(clean.decode_s_per_token, rel=0.02)
  assert f.decode_s_per_token == pytest.approx(TRUE["decode"], rel=0.05)
  # Episode quality is reported with and without the 4 x 45 s of stalls the clock leaves out.
  assert f.quality["ratio_total"] < 0.95
  assert f.quality["without_stalls"]["ratio_total"] == pytest.approx(1.0, abs=0.02)


def test_tool_wall_time_against_sandbox_cpu_time():
  trajs = _synthetic(10, 6)
  for t in trajs:
    for m in t.messages:
      if m["role"] == "tool":
        m["meta"]["cpu_s"] = m["meta"]["wall_s"] / 5.0
  tc = cal.fit(_episodes(trajs), "calls").quality["tool_cpu"]
  assert tc["wall_per_cpu_s"] == pytest.approx(5.0) and tc["corr"] == pytest.approx(1.0)


def test_standard_errors_say_when_episodes_cannot_separate_the_rates():
  # Per-call records pin the rates; episodes that all ran alike do not (wide errors).
  calls = cal.fit(_episodes(_synthetic(60, 7)), "calls")
  assert calls.quality["se"]["decode_s_per_token"] < 0.02 * TRUE["decode"]
  alike = _synthetic(30, 8, per_call=False)
  for t in alike:  # every episode the same counts: prefill and decode are collinear with tools
    b = t.metadata["budget"]["tokens"]
    b["prefill_tokens"], b["decode_tokens"] = 2000, 400
  f = cal.fit(_episodes(alike), "episodes")
  assert f.quality["se"]["decode_s_per_token"] > TRUE["decode"]

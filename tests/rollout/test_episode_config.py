"""The one episode config (rollout/episode_config.py): role defaults, flags, sandbox limits."""

from __future__ import annotations

import pytest
from absl import flags

from klong_jax.eval import runner
from klong_jax.factory.distill import DistillConfig
from klong_jax.rollout import episode_config as ec
from klong_jax.rollout.worker import WorkerConfig


def test_role_defaults_are_the_old_per_role_defaults():
  rl, ev, di = ec.ROLE_DEFAULTS["rl"], ec.ROLE_DEFAULTS["eval"], ec.ROLE_DEFAULTS["distill"]
  assert (rl.max_steps, rl.time_limit_s, rl.tool_timeout_s, rl.reproduce_timeout_s) == (
      50, 600.0, 120.0, 300.0)
  assert (ev.max_steps, ev.time_limit_s, ev.tool_timeout_s, ev.reproduce_timeout_s) == (
      1_000_000, 12 * 3600.0, 600.0, 0.0)
  assert (di.model, di.max_steps, di.time_limit_s, di.reproduce_timeout_s) == (
      "teacher", 12, 120.0, 60.0)
  assert WorkerConfig("u", "t", "s", "k").episode == rl
  assert DistillConfig("t", "u", "o", "k").episode == di
  assert runner.EvalConfig("t", "u", "o").episode == ev


def test_agent_config_wall_and_reproduce_limit():
  ep = ec.EpisodeConfig(max_steps=3, tool_timeout_s=120.0, temperature=0.6, context_overlap=8)
  a = ep.agent_config(30.0)
  assert (a.max_steps, a.time_limit_s, a.tool_timeout_s, a.temperature, a.context_overlap) == (
      3, 30.0, 30.0, 0.6, 8)
  assert ep.wall_s(30.0) == 30.0 * 1.5 + 60.0
  assert ec.ROLE_DEFAULTS["eval"].reproduce_timeout(None) == 3600.0
  assert ep.reproduce_timeout(None) == 300.0


def test_sandbox_limits_from_the_command_line():
  fv = flags.FlagValues()
  ec.define_flags("rl", fv)
  fv(["worker", "--max_steps=7", "--sandbox_limits=mem_bytes=2147483648,pids=512,cpus=2",
      "--temperature=0.6"])
  ep = ec.from_flags("rl", fv)
  assert dict(ep.limits) == {"mem_bytes": 2147483648, "pids": 512, "cpus": 2.0}
  assert (ep.max_steps, ep.temperature, ep.time_limit_s) == (7, 0.6, 600.0)
  with pytest.raises(KeyError, match="'mem' unknown; valid: .*'mem_bytes'"):
    ec.parse_limits("mem=1")
  with pytest.raises(ValueError, match="unknown sandbox limit"):
    ec.EpisodeConfig(limits={"nope": 1})
  assert ec.parse_limits(ec.format_limits(ep.limits)) == ep.limits


def test_flat_fields_split_and_eval_json_stays_flat():
  w = WorkerConfig.from_fields(server="u", tasks="t", stream="s", tokenizer="k", max_steps=4,
                               limits={"pids": 64}, group_size=2)
  assert (w.group_size, w.episode.max_steps, dict(w.episode.limits)) == (2, 4, {"pids": 64})
  cfg = runner.EvalConfig.from_fields(tasks="t", server="u", out="o", budget_s=90,
                                      backend="local", limits={"pids": 64})
  d = cfg.to_json()
  assert (d["budget_s"], d["backend"], d["limits"], d["max_steps"]) == (
      90.0, "local", {"pids": 64}, 1_000_000)
  assert "episode" not in d and "time_limit_s" not in d
  assert cfg.settings().budget_s == 90.0

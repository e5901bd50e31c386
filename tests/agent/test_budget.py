"""Budget clocks (agent/budget.py): a scripted episode is cut at the same action idle or under
load on the token clock and at a different one on the wall clock; snapshots; per-call seeds."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from klong_jax.agent import budget, scaffold
from klong_jax.agent import client as client_lib
from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.rollout.episode_config import EpisodeConfig
from klong_jax.sandbox.base import make_sandbox

STEPS = 8  # Scripted bash actions before the policy submits.


class LoadedTime:
  """time.monotonic plus injected 'load': delays added without sleeping (deterministic)."""

  def __init__(self):
    self.offset = 0.0

  def now(self) -> float:
    return time.monotonic() + self.offset


class SlowSandbox:
  """A sandbox whose every command takes `delay_s` longer on the (loaded) clock."""

  def __init__(self, sb, clock: LoadedTime, delay_s: float):
    self.sb, self.clock, self.delay_s = sb, clock, delay_s

  def exec(self, *a, **kw):
    self.clock.offset += self.delay_s
    return self.sb.exec(*a, **kw)


def _policy(model_delay_s: float):
  """Replays STEPS bash calls then submits; sleeps `model_delay_s` per call (a slow server)."""
  state = {"n": 0}

  def policy(messages, tools):
    del messages, tools
    time.sleep(model_delay_s)
    state["n"] += 1
    i = state["n"]
    if i > STEPS:
      return {"role": "assistant", "content": "", "tool_calls": [{
          "id": f"c{i}", "type": "function",
          "function": {"name": "submit", "arguments": json.dumps({"end_message": "ok"})}}]}
    return {"role": "assistant", "content": f"step {i}", "tool_calls": [{
        "id": f"c{i}", "type": "function",
        "function": {"name": "bash", "arguments": json.dumps({"cmd": f"echo out{i}"})}}]}
  return policy


RATES = budget.TokenRates(prefill_s_per_token=0.001, decode_s_per_token=0.02, tool_cost="table",
                          tool_costs="bash=1.0,default=0.0")


def _episode(binding: str, limit_s: float, tool_delay_s: float, model_delay_s: float):
  url, stop = serve_in_thread(_policy(model_delay_s))
  loaded = LoadedTime()
  clock = budget.EpisodeClock(binding, RATES, now=loaded.now)
  cfg = scaffold.AgentConfig(time_limit_s=limit_s, reminder_every=2, max_steps=50,
                             min_submit_fraction=0.0, retry_backoff_s=0.01)
  prefix = scaffold.initial_messages("Do the task.", "PAPER", "")
  try:
    with make_sandbox("local") as sb:
      sb.exec("mkdir -p /workspace/submission", 10)
      return scaffold.run_episode(client_lib.make_client(url), SlowSandbox(sb, loaded,
                                                                            tool_delay_s),
                                  prefix, cfg, clock=clock)
  finally:
    stop()


def _actions(ep):
  return [m for m in ep.messages if m["role"] == "assistant"]


def _strip(messages):
  """Messages without the per-turn meta (its `t` is the binding clock, compared separately)."""
  return [{k: v for k, v in m.items() if k != "meta"} for m in messages]


def test_token_clock_cuts_at_the_same_action_idle_or_loaded():
  idle = _episode("tokens", 5.0, tool_delay_s=0.0, model_delay_s=0.0)
  loaded = _episode("tokens", 5.0, tool_delay_s=10.0, model_delay_s=0.3)
  assert idle.status == loaded.status == "agent_timeout"
  assert idle.end_reason == "time_limit" and 1 < idle.steps < STEPS
  assert loaded.steps == idle.steps
  assert _strip(loaded.messages) == _strip(idle.messages)  # Reminders included (token time).
  assert [m["meta"]["t"] for m in _actions(loaded)] == [m["meta"]["t"] for m in _actions(idle)]
  assert loaded.budget_s == idle.budget_s >= 5.0
  # Both clocks are recorded: the load shows on the wall clock only.
  assert loaded.clock["wall"]["total_s"] > idle.clock["wall"]["total_s"] + 10.0 * (idle.steps - 1)
  assert loaded.clock["tokens"] == idle.clock["tokens"]
  # The reference: the token clock is tool calls x table cost + tokens x rates.
  tok = idle.clock["tokens"]
  assert tok["tool_calls"] == idle.steps and tok["tool_s"] == idle.steps * 1.0
  assert idle.budget_s == pytest.approx(tok["tool_s"] + tok["prefill_tokens"] * 0.001
                                        + tok["decode_tokens"] * 0.02)


def test_wall_clock_cuts_earlier_under_injected_load():
  idle = _episode("wall", 30.0, tool_delay_s=0.0, model_delay_s=0.0)
  loaded = _episode("wall", 30.0, tool_delay_s=10.0, model_delay_s=0.0)
  assert idle.status == "completed" and idle.steps == STEPS + 1  # Never near the limit.
  assert loaded.status == "agent_timeout" and loaded.steps == 3  # 3 x 10 s of load >= 30 s.
  assert loaded.budget_s >= 30.0 and loaded.budget_clock == "wall"


def test_snapshot_restore_carries_both_clocks():
  t = [100.0]
  clock = budget.EpisodeClock("tokens", RATES, now=lambda: t[0])
  clock.charge_model(500, 120, 40, retry_s=2.0)
  clock.charge_tool("bash", cpu_s=None)
  clock.charge_tool("python", cpu_s=0.25)  # Table mode: the CPU time is not charged.
  t[0] = 110.0
  snap = json.loads(json.dumps(clock.snapshot()))
  assert snap["budget_s"] == pytest.approx(120 * 0.001 + 40 * 0.02 + 1.0)
  assert snap["wall"]["total_s"] == 10.0 and snap["wall"]["retry_s"] == 2.0
  t[0] = 5000.0  # The episode resumes much later (another process, another machine).
  again = budget.EpisodeClock("wall", now=lambda: t[0])
  again.restore(snap)
  assert again.binding == "tokens" and again.elapsed() == pytest.approx(snap["budget_s"])
  assert again.snapshot()["tokens"] == snap["tokens"]
  t[0] = 5003.0
  assert again.wall.elapsed() == pytest.approx(10.0 - 2.0 + 3.0)  # Down time not counted.
  with pytest.raises(ValueError, match="budget clock 'cpu' must be one of"):
    budget.EpisodeClock("cpu")


def test_cpu_mode_charges_measured_cpu_and_table_when_unmeasured():
  clock = budget.TokenClock(budget.TokenRates(tool_cost="cpu", tool_costs="bash=2,default=0.5"))
  clock.charge_tool("bash", cpu_s=0.125)
  clock.charge_tool("bash", cpu_s=None)
  clock.charge_tool("submit", cpu_s=None)
  assert clock.tool_s == pytest.approx(0.125 + 2 + 0.5) and clock.tool_calls_cpu == 1
  for bad in ("bash", "bash=x", "=1", "bash=-1"):
    with pytest.raises(ValueError, match="tool cost entry"):
      budget.parse_costs(bad)
  with pytest.raises(ValueError, match="tool_cost 'wall' must be one of"):
    budget.TokenRates(tool_cost="wall")
  with pytest.raises(ValueError, match="budget_clock 'cpu' must be one of"):
    EpisodeConfig(budget_clock="cpu")


def test_local_sandbox_reports_command_cpu_time():
  with make_sandbox("local") as sb:
    busy = sb.exec("python3 -c 'import time\nt = time.process_time()\n"
                   "while time.process_time() - t < 0.3: pass'", 60)
    idle = sb.exec("sleep 0.3", 60)
  assert busy.ok and busy.cpu_s is not None and busy.cpu_s >= 0.28
  assert idle.cpu_s is not None and idle.cpu_s < 0.2  # Wall time is not CPU time.


def test_uncached_prefill_is_the_prompt_less_the_reused_tokens():
  assert budget.uncached_prefill(1000, 800) == 200
  assert budget.uncached_prefill(100, 800) == 0 and budget.uncached_prefill(100, -5) == 100


def test_token_wall_guard_is_a_hang_guard():
  wall, tokens = EpisodeConfig(), EpisodeConfig(budget_clock="tokens", hang_factor=4.0)
  assert wall.wall_s(20.0) == 20.0 * 1.5 + 60.0
  assert tokens.wall_s(20.0) == 4.0 * wall.wall_s(20.0)
  acfg = tokens.agent_config(20.0, seed_key=("t", "g", 1))
  assert acfg.budget_clock == "tokens" and acfg.seed_key == ("t", "g", 1)
  assert acfg.token_rates == tokens.token_rates()


def test_request_seed_is_a_stable_hash_of_task_group_member_turn():
  ref = int.from_bytes(hashlib.sha256(b"arith-1\x1farith-1-s0-r0\x1f2\x1f7").digest()[:8],
                       "big") % 2**31
  assert budget.request_seed("arith-1", "arith-1-s0-r0", 2, 7) == ref
  seeds = {budget.request_seed("arith-1", "arith-1-s0-r0", m, t) for m in range(8)
           for t in range(50)}
  assert len(seeds) == 8 * 50  # Members and turns differ.
  assert budget.request_seed("arith-2", "arith-1-s0-r0", 2, 7) != ref
  assert budget.request_seed("arith-1", "arith-1-s0-r1", 2, 7) != ref
  # Not Python's salted hash(): another interpreter with another hash seed agrees.
  code = ("from klong_jax.agent import budget; "
          "print(budget.request_seed('arith-1', 'arith-1-s0-r0', 2, 7))")
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60, check=True)
  assert int(out.stdout) == ref


def test_scaffold_sends_per_turn_seeds():
  url, stop = serve_in_thread(_policy(0.0))
  cfg = scaffold.AgentConfig(max_steps=3, reminder_every=0, seed_key=("task", "grp", 1))
  try:
    with make_sandbox("local") as sb:
      ep = scaffold.run_episode(client_lib.make_client(url), sb, [{"role": "user",
                                                                   "content": "go"}], cfg)
  finally:
    stop()
  assert [m["meta"]["seed"] for m in _actions(ep)] == [
      budget.request_seed("task", "grp", 1, t) for t in (1, 2, 3)]


def test_group_members_run_concurrently_with_their_seed_keys():
  from klong_jax.rollout.worker import Worker
  w = Worker.__new__(Worker)
  w.cfg = types.SimpleNamespace(group_size=3, ckpt_every_steps=0, ckpt_every_s=0.0)
  barrier = threading.Barrier(3, timeout=30)  # Sequential members would never all arrive.

  def rollout(task, stage, limit, ckpt=None, seed_key=None, budget_clock=""):
    barrier.wait()
    return {"key": seed_key, "stage": stage, "limit": limit, "clock": budget_clock,
            "metadata": {}}

  w.rollout_with_retries = rollout
  w.to_record = lambda r, *args: r
  ctl = types.SimpleNamespace(stage=0, budget_clock="tokens", policy_min_version=0)
  out = w.run_group(types.SimpleNamespace(id="t1", config={}), "t1-s0-r0", ctl, 20.0)
  assert [r["key"] for r in out] == [("t1", "t1-s0-r0", i) for i in range(3)]
  assert {r["clock"] for r in out} == {"tokens"}


def test_control_carries_the_curriculums_clock(tmp_path):
  from klong_jax.rl.curriculum import Curriculum, Stage
  from klong_jax.rollout.stream import read_control, write_json_atomic
  cur = Curriculum([Stage(time_limit_s=15.0)], budget_clock="tokens")
  write_json_atomic(tmp_path / "control.json", cur.control(3))
  ctl = read_control(str(tmp_path))
  assert (ctl.budget_clock, ctl.time_limit_s, ctl.policy_min_version) == ("tokens", 15.0, 3)
  write_json_atomic(tmp_path / "control.json", Curriculum([Stage(time_limit_s=1.0)]).control())
  assert read_control(str(tmp_path)).budget_clock == ""  # The workers' own clock.
  write_json_atomic(tmp_path / "control.json", {"budget_clock": "cpu"})
  with pytest.raises(ValueError, match="budget_clock 'cpu' must be one of"):
    read_control(str(tmp_path))
  with pytest.raises(ValueError, match="curriculum.budget_clock 'cpu'"):
    Curriculum([Stage(time_limit_s=1.0)], budget_clock="cpu")

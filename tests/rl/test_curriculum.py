"""Progressive curriculum: config parsing, step and promotion rules, control file, state."""

import pytest

from klong_jax.rl.curriculum import Curriculum, Stage, stages_from_config


def test_stages_from_config_and_errors():
  st = stages_from_config([dict(time_limit_s=2.0, steps=3, tasks="fib-*,arith-*"),
                           dict(time_limit_s=4.0, promote_reward=0.5, min_steps=1)])
  assert st[0].tasks == ("fib-*", "arith-*") and st[1].promote_reward == 0.5
  with pytest.raises(ValueError, match=r"stages\[0\] has unknown keys \['limit'\]"):
    stages_from_config([dict(limit=3)])
  with pytest.raises(ValueError, match="empty"):
    stages_from_config([])
  with pytest.raises(ValueError, match="time_limit_s > 0"):
    Stage(time_limit_s=0)


def test_step_rule_and_control():
  c = Curriculum([Stage(10.0, steps=2, tasks=("a*",)), Stage(20.0)])
  assert c.control(3) == {"stage": 0, "time_limit_s": 10.0, "policy_min_version": 3,
                          "tasks": ["a*"]}
  assert not c.observe(1, 0.0) and c.observe(2, 0.0)
  assert c.advance(2).time_limit_s == 20.0
  assert c.control() == {"stage": 1, "time_limit_s": 20.0, "policy_min_version": -1}
  assert not c.observe(100, 1.0)  # the last stage never ends
  with pytest.raises(ValueError, match="last stage"):
    c.advance(3)


def test_promotion_rule_uses_window_and_min_steps():
  c = Curriculum([Stage(1.0, promote_reward=0.5, min_steps=3), Stage(2.0)], window=2)
  assert not c.observe(1, 0.9)          # window not full
  assert not c.observe(2, 0.9)          # window full but min_steps not reached
  assert not c.observe(3, 0.0)          # mean 0.45 < 0.5
  assert not c.observe(4, None)         # no new element: window unchanged
  assert c.observe(5, 1.0)              # mean 0.5
  c.advance(5)
  d = c.state_dict()
  c2 = Curriculum([Stage(1.0, promote_reward=0.5, min_steps=3), Stage(2.0)], window=2)
  c2.load_state_dict(d)
  assert (c2.index, c2.start_step) == (1, 5)
  with pytest.raises(ValueError, match="out of range"):
    Curriculum([Stage(1.0)]).load_state_dict(d)

"""launch/local.py: dry-run plan, sweep overrides, and a local run of fake roles to a clean stop."""

import os
import subprocess
import sys

import pytest

from klong_jax.launch import experiment as xp
from klong_jax.launch import procs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import demo as demo_config  # noqa: E402
from launch import local  # noqa: E402


@pytest.mark.subprocess
def test_dry_run_prints_every_role_and_writes_nothing(tmp_path):
  wd = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "launch/local.py", "--config=configs/demo.py", f"--workdir={wd}",
       "--dry_run", "--config.workers.num=3", "--init_checkpoint=/ckpt/sft"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
  for name in ("[trainer] (primary)", "[server]", "[worker0]", "[worker1]", "[worker2]"):
    assert name in out, out
  assert "-m klong_jax.rl.train" in out and "--init_checkpoint=/ckpt/sft" in out
  assert f"--stream={wd}/stream" in out and f"--policy_dir={wd}/policy" in out
  assert "-m klong_jax.rollout.worker" in out and "--worker=worker2" in out
  assert not wd.exists()


def test_sweep_makes_one_work_unit_per_override_set(tmp_path):
  c = demo_config.get_config()
  units = local.work_units(c, str(tmp_path), ["rl.mode=sync", "seed=3,workers.num=1"],
                           dry_run=True)
  assert len(units) == 2
  assert units[0].workdir == str(tmp_path / "wu0")
  assert "--mode=sync" in units[0].jobs[0].executable.argv()
  assert "--config.seed=3" in units[1].jobs[0].executable.argv()
  assert [j.name for j in units[1].jobs] == ["trainer", "server", "worker0"]


def test_sync_mode_needs_a_worker_per_group_of_a_step(tmp_path):
  c = local.apply_overrides(demo_config.get_config(), local.parse_overrides(
      "rl.mode=sync,workers.num=2"))
  with pytest.raises(ValueError, match="workers.num >= the RL config's groups per step"):
    local.work_units(c, str(tmp_path), [], dry_run=True)


def test_overrides_are_typed_and_unknown_keys_fail():
  c = demo_config.get_config()
  c2 = local.apply_overrides(c, local.parse_overrides("workers.num=7,rl.mode=sync"))
  assert c2.workers.num == 7 and c2.rl.mode == "sync"
  assert c.workers.num == demo_config.get_config().workers.num != 7  # the base is not edited
  with pytest.raises(KeyError, match="no field 'nmu'"):
    local.apply_overrides(c, {"workers.nmu": 1})
  with pytest.raises(ValueError, match="key=value"):
    local.parse_overrides("oops")


def _fake_exp(tmp_path, jobs):
  exp = xp.Experiment("fake", str(tmp_path))
  for name, code, kw in jobs:
    exp.add(xp.Job(name, _CodeExe(code), **kw))
  return exp


class _CodeExe(xp.Executable):
  """An Executable running `python -c code` (fake roles for launcher tests)."""

  def __init__(self, code):
    super().__init__("unused")
    self.code = code

  def argv(self, python=""):
    return [sys.executable, "-c", self.code]


@pytest.mark.subprocess
def test_run_local_stops_servers_when_primary_ends(tmp_path):
  ready = tmp_path / "srv.ready"
  exp = _fake_exp(tmp_path, [
      ("server", f"import time; open({str(ready)!r}, 'w'); time.sleep(120)",
       dict(ready=f"file:{ready}")),
      ("trainer", "import time; time.sleep(1); print('trained')", dict(primary=True)),
  ])
  codes = xp.run_local(exp, timeout_s=60, printer=lambda s: None)
  assert codes["trainer"] == 0 and codes["server"] is not None and codes["server"] < 0
  assert "trained" in (tmp_path / "logs" / "trainer.log").read_text()


@pytest.mark.subprocess
def test_run_local_fails_fast_when_a_role_dies(tmp_path):
  exp = _fake_exp(tmp_path, [
      ("worker0", "import sys; print('worker exploded'); sys.exit(2)", {}),
      ("trainer", "import time; time.sleep(120)", dict(primary=True)),
  ])
  with pytest.raises(procs.RoleError, match=r"(?s)'worker0' failed with code 2.*worker exploded"):
    xp.run_local(exp, timeout_s=60, printer=lambda s: None)


def test_experiment_requires_primary_and_unique_names(tmp_path):
  exp = xp.Experiment("x", str(tmp_path))
  exp.add(xp.Job("a", xp.Executable("m")))
  with pytest.raises(ValueError, match="already has a job named 'a'"):
    exp.add(xp.Job("a", xp.Executable("m")))
  with pytest.raises(ValueError, match="no primary job"):
    xp.run_local(exp)


def test_executable_argv_flags():
  exe = xp.Executable("pkg.mod", {"a": 1, "yes": True, "no": False, "skip": None, "m": [1, 2]},
                      positional=("distill",))
  assert exe.argv("py") == ["py", "-m", "pkg.mod", "distill", "--a=1", "--yes", "--nono",
                            "--m=1", "--m=2"]

"""Agent-caused failures are the agent's outcome: graded (as an empty submission), the reason
recorded, never retried and never infra_error. Interrupted shard writes are cleaned at start."""

import os
import shutil
import time

import pytest

from klong_jax.data import tokenizer
from klong_jax.data.schema import from_bytes
from klong_jax.rollout import episode
from klong_jax.rollout.worker import Worker, WorkerConfig, clean_stale_temps
from klong_jax.tasks import bundled_tasks_dir, load_task

# What the agent does to its submission after solving the task, and the failure_reason it gets.
ATTACKS = {
    "sparse_300m": ("truncate -s 300M big.bin", "submission_too_large"),
    "too_many_files": ("mkdir many && touch many/f{1..40}", "submission_too_many_files"),
    "removed": ("cd / && rm -rf /workspace/submission", "submission_missing"),
    "backslash_name": ("echo x > 'a\\b.txt'", "submission_bad_name"),
}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return tokenizer.default_tokenizer(tmp_path_factory.mktemp("tok")).path


def _worker(tmp_path, url, tok_path, backend="local", **limits):
  return Worker(WorkerConfig.from_fields(
      server=url, tasks=bundled_tasks_dir(), stream=str(tmp_path / "s"),
                             tokenizer=tok_path, group_size=1, backend=backend, max_steps=6,
                             time_limit_s=60.0, reproduce_timeout_s=30.0, worker="w",
                             infra_retries=2, infra_backoff_s=0.0, limits=limits))


def _attack_after_episode(monkeypatch, cmd):
  """Runs `cmd` in the submission dir when the (scripted, correct) agent's episode ends."""
  calls = []
  real = episode.run_guarded

  def run_guarded(client, sb, *a, **kw):
    calls.append(1)
    ep = real(client, sb, *a, **kw)
    r = sb.exec(f"cd /workspace/submission && {cmd}", timeout_s=30)
    assert r.ok, r
    return ep
  monkeypatch.setattr(episode, "run_guarded", run_guarded)
  return calls


def _record(w, r):
  return from_bytes(w.to_record(r, "arith-1", "g", 0, 0, -1))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_agent_caused_failure_is_graded_not_retried(attack, tmp_path, teacher_url, tok_path,
                                                    monkeypatch):
  cmd, reason = ATTACKS[attack]
  calls = _attack_after_episode(monkeypatch, cmd)
  w = _worker(tmp_path, teacher_url, tok_path, max_get_files=30)
  t = _record(w, w.rollout_with_retries(load_task(f"{bundled_tasks_dir()}/arith-1"), 0, 60.0))
  assert len(calls) == 1  # Not re-run as an infra failure.
  assert t.status == "completed" and t.reward == 0.0, (t.status, t.reward, t.metadata)
  assert t.metadata["failure_reason"] == reason, t.metadata
  assert t.metadata["failure_detail"]
  assert t.metadata["reproduce_exit"] == 127  # Graded as an empty submission.


def test_clean_submission_has_no_failure_reason(tmp_path, teacher_url, tok_path, monkeypatch):
  calls = _attack_after_episode(monkeypatch, "true")
  w = _worker(tmp_path, teacher_url, tok_path)
  t = _record(w, w.rollout_with_retries(load_task(f"{bundled_tasks_dir()}/arith-1"), 0, 60.0))
  assert len(calls) == 1 and t.reward == 1.0 and "failure_reason" not in t.metadata


@pytest.mark.docker
def test_docker_sparse_file_is_graded_not_retried(image, tmp_path, teacher_url, tok_path,
                                                  monkeypatch):
  calls = _attack_after_episode(monkeypatch, "truncate -s 300M big.bin")
  w = _worker(tmp_path, teacher_url, tok_path, backend="docker", image=image)
  t0 = time.time()
  t = _record(w, w.rollout_with_retries(load_task(f"{bundled_tasks_dir()}/arith-1"), 0, 60.0))
  assert len(calls) == 1 and t.status == "completed" and t.reward == 0.0, t.metadata
  assert t.metadata["failure_reason"] == "submission_too_large"
  assert "big.bin (300.0 MiB)" in t.metadata["failure_detail"]
  assert time.time() - t0 < 120


def test_clean_stale_temps(tmp_path):
  stage = tmp_path / "0"
  stage.mkdir()
  own = stage / ".w-000003.array_record.tmp-0123abcd"
  other_live = stage / ".w2-000001.array_record.tmp-89abcdef"
  other_dead = stage / ".w2-000000.array_record.tmp-deadbeef"
  prefix_name = stage / ".w-000001-000000.array_record.tmp-00000000"  # Worker "w-000001".
  shard = stage / "w-000000.array_record"
  claim_tmp = tmp_path / "ledger" / "claims" / ".g.json.tmp-1234abcd"
  claim_tmp.parent.mkdir(parents=True)
  for p in (own, other_live, other_dead, prefix_name, shard, claim_tmp):
    p.write_bytes(b"x")
  old = time.time() - 2 * 3600
  os.utime(other_dead, (old, old))
  os.utime(claim_tmp, (old, old))
  assert clean_stale_temps(str(tmp_path), "w") == 3
  assert sorted(p.name for p in stage.iterdir()) == sorted(
      [other_live.name, prefix_name.name, shard.name])
  assert not claim_tmp.exists()


def test_worker_start_removes_its_interrupted_shard_write(tmp_path, teacher_url, tok_path):
  tasks = tmp_path / "tasks"
  shutil.copytree(f"{bundled_tasks_dir()}/arith-1", tasks / "arith-1")
  w = Worker(WorkerConfig.from_fields(
      server=teacher_url, tasks=str(tasks), stream=str(tmp_path / "s"),
                          tokenizer=tok_path, group_size=1, backend="local", max_steps=6,
                          time_limit_s=60.0, reproduce_timeout_s=30.0, worker="w"))
  left = tmp_path / "s" / "0" / ".w-000000.array_record.tmp-0badf00d"
  left.parent.mkdir(parents=True)
  left.write_bytes(b"partial")
  assert w.run([str(tasks / "arith-1")]) == 1
  assert not left.exists()
  assert [p.name for p in left.parent.iterdir()] == ["w-000000.array_record"]
  # The record carries the task's family (config.yaml), for family-mixed RL steps.
  from klong_jax.data.schema import from_bytes  # noqa: PLC0415
  from klong_jax.data.shards import read_shard  # noqa: PLC0415
  recs = [from_bytes(r) for r in read_shard(str(left.parent / "w-000000.array_record"))]
  assert [r.metadata["family"] for r in recs] == ["arith"]

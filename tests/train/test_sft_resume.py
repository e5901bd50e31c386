"""SFT trainer: interrupted + resumed == uninterrupted (bitwise); bad data fails cleanly."""

import json
import os

import jax
import numpy as np
import pytest

from klong_jax.data import schema, shards
from klong_jax.train import sft
from tests.train import sft_testlib as lib

pytestmark = pytest.mark.slow  # Full SFT runs (one shared, then resumed ones).
N, K = 4, 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return lib.make_env(tmp_path_factory.mktemp("sft_env"))


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, sft.run(lib.config(env, N, every=K), workdir)


def test_resume_gives_bitwise_identical_params(env, full_run, tmp_path):
  _, full = full_run
  workdir = str(tmp_path / "interrupted")
  first = sft.run(lib.config(env, N, every=K, stop_after=K), workdir)
  assert first["step"] == K
  resumed = sft.run(lib.config(env, N, every=K), workdir, resume=True)
  assert resumed["start"] == K and resumed["step"] == N
  # Same data after resume (Grain iterator state restored): identical per-step losses.
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][K:]]
  a = jax.tree.leaves(jax.device_get(full["state"].params))
  b = jax.tree.leaves(jax.device_get(resumed["state"].params))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU: same ops, same order, same data
  o1 = jax.tree.leaves(jax.device_get(full["state"].opt_state))
  o2 = jax.tree.leaves(jax.device_get(resumed["state"].opt_state))
  assert all(np.array_equal(x, y) for x, y in zip(o1, o2, strict=True))
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, N + 1))


def test_corrupt_shard_names_file_and_keeps_checkpoints(env, full_run, tmp_path):
  workdir, _ = full_run
  bad_dir = tmp_path / "bad"
  bad_dir.mkdir()
  good = shards.read_shard(env["paths"][0])
  shards.write_shard(bad_dir / "a.array_record", list(good))
  corrupt = bad_dir / "b.array_record"
  raw = open(env["paths"][1], "rb").read()
  corrupt.write_bytes(raw[: len(raw) // 2])  # truncated: footer gone
  before = lib.tree_digest(os.path.join(workdir, "checkpoints"))
  c = lib.config(env, N + 2, every=1)
  c.data.shards = str(bad_dir)
  with pytest.raises(OSError, match="b.array_record"):
    sft.run(c, workdir, resume=True)
  assert lib.tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_malformed_record_strict_names_record_and_keeps_checkpoints(env, full_run, tmp_path):
  workdir, _ = full_run
  bad_dir = tmp_path / "malformed"
  bad_dir.mkdir()
  for i, p in enumerate(env["paths"]):
    shards.write_shard(bad_dir / f"{i}.array_record", list(shards.read_shard(p)))
  rec = json.loads(list(shards.read_shard(env["paths"][0]))[0])
  rec["id"] = "broken-record-7"
  rec["tokens"][5] = 99999  # >= vocab
  shards.write_shard(bad_dir / "z.array_record", [json.dumps(rec).encode()])
  before = lib.tree_digest(os.path.join(workdir, "checkpoints"))
  c = lib.config(env, N + 40, every=1000)  # no new saves: old ones must stay as they are
  c.data.shards = str(bad_dir)
  c.data.strict = True
  with pytest.raises(schema.TrajectoryError, match="broken-record-7.*vocab"):
    sft.run(c, workdir, resume=True)
  assert lib.tree_digest(os.path.join(workdir, "checkpoints")) == before

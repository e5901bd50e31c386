"""Grain pipeline: loss-token accounting, rejects, seed determinism, resumable state, workers."""

import json

import numpy as np
import pytest

from klong_jax.data import pipeline, schema, shards, synthetic
from klong_jax.data.splitting import SplitConfig

SPLIT = SplitConfig(max_len=768, overlap=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory, fmt):
  d = tmp_path_factory.mktemp("shards")
  trajs = synthetic.make_synthetic_trajectories(fmt, 24, seed=3, max_steps=12, sampled=True)
  for s in range(2):
    shards.write_shard(d / f"w{s}.array_record", [t.to_bytes() for t in trajs[s::2]])
  return d, trajs


def cfg(**kw):
  base = dict(batch_size=4, row_len=1024, split=SPLIT, seed=0)
  return pipeline.PipelineConfig(**{**base, **kw})


def take(it, n=None):
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_every_loss_token_arrives_once(data):
  d, trajs = data
  batches = take(pipeline.make_sft_iterator(str(d), cfg()))
  assert all(b["tokens"].shape == (4, 1024) and b["num_rejected"].shape == (4,) for b in batches)
  assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(t.num_loss_tokens for t in trajs)
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) > sum(len(t) for t in trajs)
  # sampled logprobs/versions travel with their tokens
  lp = np.concatenate([b["logprobs"][b["loss_mask"] == 1] for b in batches])
  assert (lp < 0).mean() > 0.5
  assert set(np.concatenate([b["policy_version"][b["segment_ids"] == 0] for b in batches])) <= {-1}


def test_seed_determinism(data):
  d, _ = data
  a = take(pipeline.make_sft_iterator(str(d), cfg(seed=7)))
  b = take(pipeline.make_sft_iterator(str(d), cfg(seed=7)))
  c = take(pipeline.make_sft_iterator(str(d), cfg(seed=8)))
  assert_same(a, b)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_state_resume_gives_identical_batches(data):
  d, _ = data
  it = pipeline.make_sft_iterator(str(d), cfg(num_epochs=2))
  take(it, 3)
  state = it.get_state()
  rest = take(it)
  it2 = pipeline.make_sft_iterator(str(d), cfg(num_epochs=2))
  it2.set_state(json.loads(json.dumps(state)))  # state must survive serialisation
  assert_same(take(it2), rest)


def test_orbax_checkpoint_of_iterator_state(data, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  d, _ = data
  it = pipeline.make_sft_iterator(str(d), cfg())
  take(it, 2)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))
  mngr.save(2, args=ocp.args.Composite(ds_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 2)
  it2 = pipeline.make_sft_iterator(str(d), cfg())
  mngr.restore(2, args=ocp.args.Composite(ds_iter=grain.checkpoint.CheckpointRestore(it2)))
  assert_same(take(it2, 2), expected)


def test_malformed_records_counted_or_strict(data, tmp_path, tok):
  _, trajs = data
  good = [t.to_bytes() for t in trajs[:6]]
  bad_vocab = trajs[0].to_json() | {"id": "too-big"}
  bad_vocab["tokens"] = [tok.vocab_size + 5] + bad_vocab["tokens"][1:]
  infra = trajs[1].to_json() | {"id": "infra", "status": "infra_error", "reward": None}
  missing = {k: v for k, v in trajs[2].to_json().items() if k != "loss_mask"} | {"id": "nomask"}
  bad = [b"{not json", json.dumps(bad_vocab).encode(), json.dumps(infra).encode(),
         json.dumps(missing).encode()]
  shards.write_shard(tmp_path / "mixed.array_record", good[:3] + bad + good[3:])
  c = cfg(vocab_size=tok.vocab_size)
  batches = take(pipeline.make_sft_iterator(str(tmp_path), c))
  assert sum(int(b["num_rejected"].sum()) for b in batches) == 4
  assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(
      t.num_loss_tokens for t in trajs[:6])
  with pytest.raises(schema.TrajectoryError, match="nomask|too-big|infra|not valid UTF-8 JSON"):
    take(pipeline.make_sft_iterator(str(tmp_path), cfg(vocab_size=tok.vocab_size, strict=True,
                                                       shuffle=False)))


def test_repeating_pipeline_over_only_rejects_fails_instead_of_spinning(data, tmp_path, tok):
  _, trajs = data
  too_big = trajs[0].to_json() | {"id": "too-big"}
  too_big["tokens"] = [tok.vocab_size + 5] + too_big["tokens"][1:]
  shards.write_shard(tmp_path / "bad.array_record",
                     [b"{not json", json.dumps(too_big).encode()])
  it = pipeline.make_sft_iterator(str(tmp_path), cfg(vocab_size=tok.vocab_size, num_epochs=None))
  with pytest.raises(ValueError, match="all yielded nothing to train on.*too-big|not valid"):
    next(it)


def test_corrupt_shard_named_at_pipeline_start(tmp_path):
  p = tmp_path / "broken.array_record"
  p.write_bytes(b"x" * 100)
  with pytest.raises(shards.ShardError, match="broken.array_record"):
    pipeline.make_sft_iterator([str(p)], cfg())


@pytest.mark.slow
def test_worker_processes(data):
  d, trajs = data
  c = cfg(num_workers=2)
  it = pipeline.make_sft_iterator(str(d), c)
  first = take(it, 2)
  state = it.get_state()
  rest = take(it)
  it.close()
  total = sum(int(b["loss_mask"].sum()) for b in first + rest)
  assert total == sum(t.num_loss_tokens for t in trajs)
  it2 = pipeline.make_sft_iterator(str(d), c)
  it2.set_state(state)
  resumed = take(it2)
  it2.close()
  assert_same(resumed, rest)

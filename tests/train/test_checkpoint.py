"""Checkpointer: state + Grain iterator + JSON round trip, keep-N, best-by-metric, resharding."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from klong_jax.train import checkpoint


def _mesh():
  return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh, spec, seed=0):
  w = jax.random.normal(jax.random.key(seed), (8, 4))
  return {"params": {"w": jax.device_put(w, NamedSharding(mesh, spec))},
          "step": jnp.int32(seed)}


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def ckdir(request, tmp_path):
  """A checkpoint dir: local, or gs:// on the GCS emulator (Orbax via gcsfs + tensorstore)."""
  return request.getfixturevalue("gcs_root") if request.param == "gcs" else str(tmp_path)


def test_roundtrip_with_data_iterator_extra_and_resharding(ckdir):
  mesh = _mesh()
  ds = grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset()
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = _state(mesh, P("fsdp", None), seed=5)
  with checkpoint.Checkpointer(ckdir, save_every=1) as ck:
    assert ck.save(7, state, data_iter=it, extra={"cursor": {"shard": "a", "record": 3}})
  expected_next = [next(it) for _ in range(3)]
  # Restore into a different layout: rows over data, cols over fsdp.
  target = _state(mesh, P("data", "fsdp"), seed=0)
  it2 = iter(ds)
  with checkpoint.Checkpointer(ckdir) as ck:
    assert ck.latest_step() == 7
    got, extra = ck.restore(target, data_iter=it2)
  np.testing.assert_array_equal(got["params"]["w"], state["params"]["w"])
  assert got["params"]["w"].sharding.spec == P("data", "fsdp")
  assert int(got["step"]) == 5 and extra == {"cursor": {"shard": "a", "record": 3}}
  assert [next(it2) for _ in range(3)] == expected_next


def test_keep_n_and_save_interval(ckdir):
  mesh = _mesh()
  with checkpoint.Checkpointer(ckdir, max_to_keep=2, save_every=2) as ck:
    started = [ck.save(s, _state(mesh, P(), s)) for s in range(1, 7)]
    ck.wait()
    assert started == [False, True, False, True, False, True]
    assert ck.all_steps() == [4, 6]


def test_best_by_metric_keeps_lowest_loss(tmp_path):
  mesh = _mesh()
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_every=1,
                               best_metric="loss", best_mode="min") as ck:
    for s, v in losses.items():
      ck.save(s, _state(mesh, P(), s), metrics={"loss": v})
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.best_step() == 2
    with pytest.raises(ValueError, match="best_metric"):
      ck.save(9, _state(mesh, P(), 9), metrics={"acc": 1.0})


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore({"x": jnp.zeros(2)})


@pytest.mark.gcs
def test_gcs_step_cut_short_is_never_restored(gcs_root):
  """On gs:// a step counts only once Orbax wrote its commit_success.txt: a save killed before
  that (here: the step's objects without it) is skipped by latest_step and restore."""
  from klong_jax.data import storage
  mesh = _mesh()
  with checkpoint.Checkpointer(gcs_root, save_every=1, async_save=False) as ck:
    ck.save(3, _state(mesh, P(), 3))
    ck.save(4, _state(mesh, P(), 4))
  step4 = storage.list_objects(f"{gcs_root}/4/")
  commits = [o.path for o in step4 if o.path.endswith("/4/commit_success.txt")]
  assert len(commits) == 1 and len(step4) > 5
  storage.delete(commits[0])  # as if the save died before its commit
  with checkpoint.Checkpointer(gcs_root) as ck:
    assert ck.latest_step() == 3
    got, _ = ck.restore(_state(mesh, P(), 0))
  assert int(got["step"]) == 3

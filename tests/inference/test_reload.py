"""Policy versions on gs:// (GCS emulator): commit object, unfinished saves, hot reload."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.data import storage
from klong_jax.inference import reload

pytestmark = pytest.mark.gcs


def _tree(scale):
  return {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": {"n": jnp.full((3,), scale, jnp.int32)}}


class _Engine:
  """What PolicyWatcher needs of the serving engine."""

  def __init__(self, params):
    self.sampler = types.SimpleNamespace(params=params, policy_version=-1)

  @property
  def policy_version(self):
    return self.sampler.policy_version

  def set_params(self, params, version):
    if callable(params):  # reload.swap_in_place, run between two engine steps.
      params()
    else:
      self.sampler.params, self.sampler.policy_version = params, version


def _same(a, b):
  for x, y in zip(np.asarray(a["w"]), np.asarray(b["w"]), strict=True):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(np.asarray(a["b"]["n"]), np.asarray(b["b"]["n"]))


def test_gcs_versions_commit_and_hot_reload(gcs_root):
  root = f"{gcs_root}/run/policy"
  assert str(reload.policy_root(f"{gcs_root}/run")) == root
  assert reload.latest_version(root) is None and reload.list_versions(root) == []
  reload.save_policy(root, 0, _tree(1))
  engine = _Engine(_tree(0))
  watcher = reload.PolicyWatcher(engine, root)
  assert watcher.check() == 0 and engine.policy_version == 0
  _same(engine.sampler.params, _tree(1))
  # Version 1's save dies after Orbax wrote its objects, before the commit: no reader sees it.
  reload.save_policy(root, 1, _tree(5))
  assert storage.delete(f"{root}/1/{reload.COMMITTED}")
  assert storage.list_objects(f"{root}/1/")  # its objects are there
  assert reload.list_versions(root) == [0] and reload.latest_version(root) == 0
  assert watcher.check() is None
  with pytest.raises(FileNotFoundError, match=reload.COMMITTED):
    reload.load_policy(f"{root}/1", _tree(0))
  # The restarted trainer publishes version 1 again: the leftovers are cleared first.
  reload.save_policy(root, 1, _tree(2), dtype=jnp.bfloat16)
  assert reload.list_versions(root) == [0, 1] and watcher.check() == 1
  _same(engine.sampler.params, _tree(2))  # bf16 on GCS, loaded back into the fp32 target
  assert engine.sampler.params["w"].dtype == jnp.float32
  with pytest.raises(FileExistsError, match="immutable"):
    reload.save_policy(root, 1, _tree(3))
  reload.remove_version(root, 0)
  assert reload.list_versions(root) == [1] and not storage.list_objects(f"{root}/0/")


def test_gcs_async_publish_and_in_place_swap(gcs_root):
  """The trainer's background publish to gs:// (commit object last) and the server's in-place
  swap from there: the served tree is the published one, one copy held."""
  root = f"{gcs_root}/run2/policy"
  pub = reload.AsyncPublisher(root, jnp.bfloat16)
  pub.publish(0, _tree(3))
  pub.close()
  assert reload.list_versions(root) == [0] and pub.done == [0]
  engine = _Engine(_tree(0))
  watcher = reload.PolicyWatcher(engine, root)
  assert watcher.check() == 0 and engine.policy_version == 0
  _same(engine.sampler.params, _tree(3))  # bf16 holds these small integers exactly.
  assert engine.sampler.params["w"].dtype == jnp.float32

"""Publish a trained SFT checkpoint as a params-only policy version (what servers load).

The SFT trainer saves the whole TrainState (params, optimizer, step, router statistics); the
inference server hot-reloads `<root>/<version>` written by `inference.reload.save_policy`. This
rebuilds the state structure from the SFT config, restores the newest checkpoint into it and
saves the model (params + router bias state) as one policy version.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections


def publish_sft_policy(config: ml_collections.ConfigDict, checkpoint_dir: str, policy_root: str,
                       version: int = 0) -> pathlib.Path:
  """Restores the newest SFT checkpoint in `checkpoint_dir`; writes `<policy_root>/<version>`."""
  from flax import nnx  # noqa: PLC0415 - JAX only on this path

  from klong_jax.inference import reload  # noqa: PLC0415
  from klong_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  from klong_jax.parallel import rules as rules_lib  # noqa: PLC0415
  from klong_jax.train import checkpoint  # noqa: PLC0415
  from klong_jax.train import step as step_lib  # noqa: PLC0415

  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"SFT checkpoint dir {checkpoint_dir} does not exist; run SFT first")
  rules = tuple(config.rules or rules_lib.LOGICAL_RULES)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, graphdef, params, rest, tx, state_sh = step_lib.build_trainer_parts(config, mesh, rules)
  state = step_lib.init_state(params, rest, tx, state_sh)
  with checkpoint.Checkpointer(checkpoint_dir, async_save=False) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}; did SFT finish?")
    state, _ = ckpt.restore(state)
  return reload.save_policy(policy_root, version, nnx.merge(graphdef, state.params, state.rest))

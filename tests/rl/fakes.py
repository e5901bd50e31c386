"""Fake rollout groups written as stream shards (what workers publish), for RL tests."""

import os

import numpy as np

from klong_jax.data import schema, shards, storage


def make_trajectory(tid: str, group_id: str, reward: float | None, version: int, n: int = 100,
                    prefix: int = 20, stage: int = 0, seed: int = 0,
                    metadata: dict | None = None, status: str = "completed"
                    ) -> schema.Trajectory:
  """A rollout of `n` tokens: a `prefix`-token prompt, then alternating tool / policy turns."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 500, size=n).astype(np.int32)
  mask = np.zeros(n, np.int32)
  turn_starts = [0, prefix]
  for s in range(prefix, n, 20):  # 10 policy tokens, then 10 tool tokens
    mask[s:s + 10] = 1
    turn_starts += [s, min(s + 10, n)]
  logprobs = np.where(mask > 0, -rng.uniform(0.1, 3.0, n), 0.0).astype(np.float32)
  pv = np.where(mask > 0, version, -1).astype(np.int32)
  status = "infra_error" if reward is None else status
  return schema.Trajectory(id=tid, task_id=group_id.split("-")[0], tokens=tokens,
                           loss_mask=mask, logprobs=logprobs, policy_version=pv,
                           prefix_end=prefix, group_id=group_id, stage=stage, status=status,
                           reward=reward, turn_starts=sorted(set(turn_starts)),
                           metadata=dict(metadata or {}))


def write_group(stream: str, stage: int, name: str, rewards: list[float | None], version: int,
                n: int = 100, seed: int = 0, metadata: dict | None = None,
                statuses: list[str] | None = None) -> str:
  """Publishes one group shard `<stream>/<stage>/<name>.array_record` (local or gs://)."""
  gid = f"t{name}-s{stage}"
  trajs = [make_trajectory(f"{gid}-{i}", gid, r, version, n=n, stage=stage, seed=seed + i,
                           metadata=metadata,
                           status=statuses[i] if statuses else "completed")
           for i, r in enumerate(rewards)]
  path = storage.join(stream, str(stage), f"{name}.array_record")
  shards.write_shard(path, [t.to_bytes() for t in trajs])
  if not storage.is_gcs(path):  # (gs://: the publish order is the order of these calls)
    os.utime(path, ns=(seed * 1_000_000 + 1, seed * 1_000_000 + 1))  # stable publish order
  return path

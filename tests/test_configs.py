"""Experiment configs agree where training and inference must (the context policy)."""

from __future__ import annotations

from configs import rl_tiny, sft_tiny
from klong_jax.rl import train as rl_train


def test_sft_and_rl_split_alike_and_never_truncate_the_prefix():
  sft, rl = sft_tiny.get_config().data, rl_tiny.get_config().data
  assert sft.truncate is False  # True only in the ablation's "truncated" arm.
  split = rl_train.stream_config(rl_tiny.get_config(), "/tmp/s", sync=False).split
  assert split.truncate is False
  for key in ("overlap", "completion_tokens", "train_overlap"):
    assert sft[key] == rl[key], key

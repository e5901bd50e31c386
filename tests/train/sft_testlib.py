"""Shared set-up for the SFT trainer tests: tokenizer, synthetic shards, small configs."""

import hashlib
import os
import pathlib

from configs import sft_tiny
from klong_jax.data import chat, synthetic, tokenizer


def make_env(root: pathlib.Path, num: int = 32) -> dict:
  """Tokenizer (bundled, vocab 512), `num` synthetic trajectories in 2 shards, an XLA cache dir."""
  tok = tokenizer.default_tokenizer(root / "tok", vocab_size=512)
  fmt = chat.ChatFormat(tok)
  paths = synthetic.write_synthetic_shards(root / "data", fmt, num, seed=0)
  trajs = synthetic.make_synthetic_trajectories(fmt, num, seed=0)
  return {"root": root, "tok": tok, "fmt": fmt, "data": str(root / "data"), "paths": paths,
          "unigram": synthetic.unigram_baseline(trajs), "cache": str(root / "xla_cache")}


def config(env: dict, steps: int, every: int, **train):
  """sft_tiny on the env's shards: `steps` steps, checkpoints every `every`, 8 fake devices."""
  c = sft_tiny.get_config()
  c.data.shards = env["data"]
  c.data.tokenizer_cache = str(env["root"] / "tok")
  c.train.steps = steps
  c.optim.total_steps = steps
  c.optim.warmup_steps = 2
  c.optim.lr = 5e-3
  c.train.log_every = 2
  c.train.compilation_cache_dir = env["cache"]
  c.checkpoint.every = every
  c.mesh.data, c.mesh.fsdp = 2, -1
  c.train.update(train)
  return c


def tree_digest(directory: str) -> dict[str, str]:
  """sha256 of every file under `directory` (to prove checkpoints are untouched)."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out

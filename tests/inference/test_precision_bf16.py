"""bf16 trainer vs sampler: with the shared compute-dtype policy (model/precision.py) the RL loss's
forward (rl/step.rl_loss) gives the sampler's logprobs and expert choice for the same tokens;
the old cast (every float leaf to bf16: router and norm scales rounded) does not."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from klong_jax.inference.engine import Engine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer
from klong_jax.rl import step as rl_step
from klong_jax.train import optim
from klong_jax.train import step as step_lib

PAD = 96
LENGTHS = (20, 33, 47, 60)


def _all_floats_bf16(params, dtype):
  """The cast before the policy: every floating leaf to the compute dtype."""
  dtype = optim.resolve_dtype(dtype)
  return jax.tree.map(
      lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


@pytest.fixture(scope="module")
def setup():
  """A bf16-compute tiny MoE with trained-like weights (norm scales off 1, a sharper router),
  and 4 sampled completions with their logprobs and recorded expert ids."""
  # Reference attention on both sides: this test isolates the dtype policy. (With CPU "auto" the
  # trainer's full forward runs the blockwise kernel and decode the reference one; in bf16 their
  # different accumulation order alone gave a max logprob gap of 1.6e-2.)
  cfg = get_preset("tiny").replace(dtype="bfloat16", attention_impl="reference")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)

  def trained_like(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return x * (1 + 0.3 * jnp.asarray(rng.standard_normal(x.shape), x.dtype))
    return x * 10 if "router" in name else x

  nnx.update(model, jax.tree_util.tree_map_with_path(trained_like, nnx.state(model, nnx.Param)))
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in LENGTHS]
  sampler = Sampler(model, max_batch=4, max_len=PAD, min_prefill_bucket=32, min_prefill_rows=4)
  outs = Engine(sampler).generate(
      prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=3, return_routing=True))
  batch = {k: np.zeros((len(prompts), PAD), np.int32) for k in
           ("tokens", "segment_ids", "loss_mask")}
  batch["positions"] = np.tile(np.arange(PAD, dtype=np.int32), (len(prompts), 1))
  batch["logprobs"] = np.zeros((len(prompts), PAD), np.float32)
  batch["advantages"] = np.zeros((len(prompts), PAD), np.float32)
  batch["routing"] = np.full((len(prompts), PAD, cfg.num_moe_layers, cfg.num_experts_per_tok),
                             -1, np.int32)
  for i, (p, c) in enumerate(zip(prompts, outs, strict=True)):
    ids = list(p) + list(c.token_ids)
    batch["tokens"][i, :len(ids)] = ids
    batch["segment_ids"][i, :len(ids)] = 1
    batch["loss_mask"][i, len(p):len(ids)] = 1
    batch["logprobs"][i, len(p):len(ids)] = c.logprobs  # Behaviour logprob at the token.
    batch["routing"][i, :len(ids)] = c.routing
  return model, sampler, {k: jnp.asarray(v) for k, v in batch.items()}


def _rl_metrics(model, batch, replay):
  """rl_loss (the RL step's loss) on the fp32 masters with bf16 compute; its sampler-vs-trainer
  logprob gap (no replay) or routing flip share (replay on)."""
  graphdef, params, rest = step_lib.split_model(model)
  rl = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                                      temperature=1.0, routing_replay=replay))
  loss = functools.partial(rl_step.rl_loss, graphdef, compute_dtype=jnp.bfloat16, rl=rl,
                           lb_coef=0.0, z_coef=0.0)
  _, m = jax.jit(loss)(params, rest, params, batch)
  return {k: float(v) for k, v in m.items() if jnp.ndim(v) == 0}


@pytest.mark.slow
def test_policy_trainer_matches_sampler_and_old_cast_does_not(setup, monkeypatch):
  model, sampler, batch = setup
  # The sampler holds the policy's dtypes: matmul weights bf16, router / bias / norms fp32.
  dtypes = {jax.tree_util.keystr(p): x.dtype
            for p, x in jax.tree_util.tree_flatten_with_path(sampler.params)[0]}
  assert all(d == jnp.float32 for k, d in dtypes.items()
             if "router" in k or "scale" in k or "bias" in k)
  assert dtypes["['moe_layers']['mlp']['gate_edf'].value"] == jnp.bfloat16

  gap = _rl_metrics(model, batch, replay=False)
  flip = _rl_metrics(model, batch, replay=True)["routing_flip"]
  print(f"policy: logprob gap max {gap['logprob_gap_max']:.2e}, routing flips {flip:.4f}")
  assert gap["loss_tokens"] == 4 * 24
  # Same weights at use: what is left is prefill/decode vs one full forward in bf16.
  assert gap["logprob_gap_max"] < 2e-3 and flip == 0.0

  monkeypatch.setattr(optim, "cast_for_compute", _all_floats_bf16)
  old_gap = _rl_metrics(model, batch, replay=False)
  old_flip = _rl_metrics(model, batch, replay=True)["routing_flip"]
  print(f"all-bf16 cast: logprob gap max {old_gap['logprob_gap_max']:.2e}, routing flips "
        f"{old_flip:.4f}")
  assert old_flip > 0.0
  assert old_gap["logprob_gap_max"] > 3 * gap["logprob_gap_max"]

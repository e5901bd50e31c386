"""Routing replay (R3) on vs off: sampler-vs-trainer logprob mismatch as the policy moves.

Run: `python -m benchmarks.routing_replay [--presets=tiny,small] [--steps=0,1,4,16]`; writes
benchmarks/results/routing_replay.json. One run per preset: the sampler (policy version v) draws
`--requests` completions at T=1 with routing recorded; the trainer then takes Adam steps
(lr `--lr`, policy-gradient surrogate on random advantages, with the aux-loss-free expert-bias
update of configs/rl_tiny.py) and after each step count in `--steps` scores the same tokens
twice with one full forward each: replaying the recorded routing (on) and recomputing it (off).
Per setting: mean |sampler logprob - trainer logprob| over sampled tokens, the share of tokens
whose expert selection differs from the sampler's in any MoE layer, the max per-token
|log ratio| and the max k3 KL term exp(r) - 1 - r; ratios on / off from the same run.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from klong_jax.inference.engine import Completion, Engine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer
from klong_jax.train import step as step_lib

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "model presets to measure")
_STEPS = flags.DEFINE_list("steps", ["0", "1", "4", "16"], "optimizer steps at which to score")
_REQUESTS = flags.DEFINE_integer("requests", 16, "sampled completions")
_PROMPT = flags.DEFINE_integer("prompt_len", 24, "prompt tokens per request")
_TOKENS = flags.DEFINE_integer("max_tokens", 40, "sampled tokens per request")
_LR = flags.DEFINE_float("lr", 3e-4, "Adam learning rate (configs/rl_tiny.py optim.lr)")
_BIAS = flags.DEFINE_float("bias_rate", 1e-3, "expert-bias update rate per step")
_SEED = flags.DEFINE_integer("seed", 0, "params, prompts and sampling seed")
_MODE = flags.DEFINE_enum("mode", "adam", ["adam", "perturb"], "adam: real optimizer steps; "
                          "perturb: no gradient (cheap to compile): each step moves every param "
                          "by lr x a random sign (an early Adam step's size) and the bias by "
                          "bias_rate x a random sign")
_OUT = flags.DEFINE_string("out", "benchmarks/results/routing_replay.json", "result JSON")


def _batch(comps: list[Completion], row_len: int, layers: int, k: int) -> dict[str, np.ndarray]:
  """One row per request: prompt + sampled tokens, loss on sampled ones, recorded routing."""
  b = len(comps)
  out = {"tokens": np.zeros((b, row_len), np.int32),
         "positions": np.tile(np.arange(row_len, dtype=np.int32), (b, 1)),
         "segment_ids": np.zeros((b, row_len), np.int32),
         "loss_mask": np.zeros((b, row_len), np.int32),
         "logprobs": np.zeros((b, row_len), np.float32),
         "routing": np.full((b, row_len, layers, k), -1, np.int16)}
  for i, c in enumerate(comps):
    p, n = len(c.prompt_ids), len(c.prompt_ids) + len(c.token_ids)
    out["tokens"][i, :n] = c.prompt_ids + c.token_ids
    out["segment_ids"][i, :n] = 1
    out["loss_mask"][i, p:n] = 1
    out["logprobs"][i, p:n] = c.logprobs
    out["routing"][i, :n] = c.routing
  return out


def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """logp[b, t] of token t under the logits at t - 1 (0 at t = 0)."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  got = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(got, ((0, 0), (1, 0)))


def _score(graphdef: Any, params: Any, rest: Any, batch: dict[str, np.ndarray],
           replay: bool) -> dict[str, float]:
  """Trainer forward vs the sampler's record on the sampled tokens."""
  model = nnx.merge(graphdef, params, rest)
  logits, aux = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                      jnp.asarray(batch["segment_ids"]),
                      jnp.asarray(batch["routing"]) if replay else None)
  logp = np.asarray(_token_logprobs(logits, jnp.asarray(batch["tokens"])))
  mask = batch["loss_mask"] > 0
  r = (logp - batch["logprobs"])[mask]
  recorded = np.all(batch["routing"] >= 0, axis=(2, 3))
  used = np.asarray(aux["moe_routing"])
  differs = np.any(np.sort(used, -1) != np.sort(batch["routing"], -1), axis=(2, 3))
  r64 = r.astype(np.float64)
  return {"mean_abs_logprob_diff": float(np.abs(r).mean()),
          "max_abs_log_ratio": float(np.abs(r).max()),
          "max_k3": float(np.max(np.expm1(r64) - r64)),
          "routing_differs_share": float(differs[recorded].mean()),
          "tokens": int(mask.sum())}


def run_preset(preset: str, steps: list[int]) -> dict[str, Any]:
  """Samples once, then trains and scores replay on vs off at each step count."""
  cfg = get_preset(preset).replace(moe_impl="blocked")
  model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
  rng = np.random.default_rng(_SEED.value)
  prompts = [rng.integers(3, cfg.vocab_size, _PROMPT.value).tolist()
             for _ in range(_REQUESTS.value)]
  row_len = _PROMPT.value + _TOKENS.value
  sampler = Sampler(model, max_batch=_REQUESTS.value, max_len=row_len + 1,
                    min_prefill_bucket=_PROMPT.value)
  t0 = time.perf_counter()
  comps = Engine(sampler, seed=_SEED.value).generate(
      prompts, SamplingParams(temperature=1.0, max_tokens=_TOKENS.value, return_routing=True))
  sample_s = time.perf_counter() - t0
  batch = _batch(comps, row_len, cfg.num_moe_layers, cfg.num_experts_per_tok)
  adv = rng.choice([-1.0, 1.0], size=(len(comps), 1)).astype(np.float32)

  graphdef, params, rest = step_lib.split_model(model)
  tx = optax.adam(_LR.value)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, rest, opt_state, batch):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      logits, aux = m(batch["tokens"], batch["positions"], batch["segment_ids"],
                      batch["routing"])
      logp = _token_logprobs(logits, batch["tokens"])
      w = batch["loss_mask"].astype(jnp.float32)
      return -jnp.sum(adv * logp * w) / jnp.sum(w), aux["moe_expert_load"]

    (_, load), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    rest = step_lib.update_expert_bias(rest, load, _BIAS.value)
    return optax.apply_updates(params, updates), rest, opt_state

  if _MODE.value == "perturb":
    key = jax.random.key(_SEED.value + 1)

    def train_step(params, rest, opt_state, batch):  # noqa: F811 - the gradient-free variant
      del batch
      nonlocal key
      key, k1, k2 = jax.random.split(key, 3)

      def move(tree, k, scale):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(treedef, [
            x + scale * jnp.sign(jax.random.normal(kk, x.shape)).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x, kk in zip(leaves, keys, strict=True)])

      return move(params, k1, _LR.value), move(rest, k2, _BIAS.value), opt_state

  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  rows, done = [], 0
  for target in sorted(steps):
    while done < target:
      params, rest, opt_state = train_step(params, rest, opt_state, jbatch)
      done += 1
    on = _score(graphdef, params, rest, batch, replay=True)
    off = _score(graphdef, params, rest, batch, replay=False)
    rows.append({"optimizer_steps": target, "replay_on": on, "replay_off": off,
                 "mean_abs_diff_ratio_on_over_off":
                     on["mean_abs_logprob_diff"] / max(off["mean_abs_logprob_diff"], 1e-12),
                 "max_k3_ratio_on_over_off": on["max_k3"] / max(off["max_k3"], 1e-12)})
    print(f"{preset} steps={target}: |dlogp| on {on['mean_abs_logprob_diff']:.2e} off "
          f"{off['mean_abs_logprob_diff']:.2e}; routing differs on "
          f"{on['routing_differs_share']:.3f} off {off['routing_differs_share']:.3f}; max k3 on "
          f"{on['max_k3']:.2e} off {off['max_k3']:.2e}", flush=True)
  return {"preset": preset, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
          "moe_layers": cfg.num_moe_layers, "requests": len(comps),
          "sampled_tokens": int(batch["loss_mask"].sum()), "sample_s": sample_s, "rows": rows}


def main(argv: list[str]) -> None:
  del argv
  steps = [int(s) for s in _STEPS.value]
  results = [run_preset(p, steps) for p in _PRESETS.value]
  summary = []
  for res in results:
    for row in res["rows"]:
      on, off = row["replay_on"], row["replay_off"]
      tag = f"{res['preset']} after {row['optimizer_steps']} steps"
      summary += [
          {"metric": f"{tag}: mean |sampler - trainer logprob|, replay on",
           "value": on["mean_abs_logprob_diff"], "unit": "nats", "baseline": "replay off",
           "baseline_value": off["mean_abs_logprob_diff"]},
          {"metric": f"{tag}: tokens with routing != sampler's, replay off",
           "value": off["routing_differs_share"], "unit": "share"},
          {"metric": f"{tag}: max per-token k3, replay on", "value": on["max_k3"],
           "unit": "nats", "baseline": "replay off", "baseline_value": off["max_k3"]}]
  out = {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
         "mode": _MODE.value, "lr": _LR.value, "bias_rate": _BIAS.value, "results": results,
         "summary": summary}
  pathlib.Path(os.path.dirname(_OUT.value) or ".").mkdir(parents=True, exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

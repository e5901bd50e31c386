"""A two-armed bandit through the real jitted RL step, for RL loss tests: after a fixed prompt the
tiny MoE picks token A or B; reward 1 for A. Shared by tests/rl/test_rl_step.py (on-policy
learning) and tests/rl/test_offpolicy.py (forced staleness)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from klong_jax.model.config import get_preset
from klong_jax.model.sharded import create_sharded_model
from klong_jax.parallel.mesh import make_mesh
from klong_jax.parallel.rules import LOGICAL_RULES, batch_sharding
from klong_jax.rl import step as rl_step
from klong_jax.train import optim
from klong_jax.train import step as step_lib

PROMPT = np.arange(5, 13, dtype=np.int32)
ARM_A, ARM_B, GROUP = 40, 41, 16


@jax.jit(static_argnums=0)
def _next_token_logp(graphdef, params, rest) -> jax.Array:
  """Jitted: op-by-op dispatch of the forward on 8 devices made the bandit tests take minutes."""
  logits, _ = nnx.merge(graphdef, params, rest)(
      jnp.asarray(PROMPT[None]), jnp.arange(len(PROMPT))[None],
      jnp.ones((1, len(PROMPT)), jnp.int32))
  return jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))


class Bandit:
  """The policy, its state and one `update` per sampled group (decoupled PPO recomputes the
  proximal log-probs first, as rl/train.py does)."""

  def __init__(self, rl: ml_collections.ConfigDict, seed: int = 1):
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1)))
    self.graphdef, params, rest = step_lib.split_model(
        create_sharded_model(get_preset("tiny"), mesh, seed=seed))
    ocfg = ml_collections.ConfigDict(dict(
        lr=1e-2, warmup_steps=1, total_steps=100, clip_norm=1.0, weight_decay=0.0, b1=0.9,
        b2=0.95, eps=1e-8, final_lr_ratio=1.0, lb_coef=0.0, z_coef=0.0, expert_bias_rate=0.0,
        compute_dtype="float32", grad_accum=1))
    tx = optim.make_optimizer(ocfg)
    sh = step_lib.state_shardings(params, rest, tx, mesh, LOGICAL_RULES)
    self.state = step_lib.init_state(params, rest, tx, sh)
    self.ref = rl_step.copy_params(self.state.params, sh.params)
    bsh = batch_sharding(mesh, LOGICAL_RULES)
    self.step = rl_step.make_rl_step(self.graphdef, tx, ocfg, rl, sh, bsh, LOGICAL_RULES)
    self.logp_fn = (rl_step.make_logprob_fn(self.graphdef, ocfg, rl, sh, bsh, LOGICAL_RULES)
                    if rl_step.off_policy(rl) == "decoupled" else None)

  def policy(self) -> np.ndarray:
    """log-probs over the vocabulary of the token after the prompt (float64)."""
    return np.asarray(_next_token_logp(self.graphdef, self.state.params, self.state.rest),
                      np.float64)

  def update(self, ys: np.ndarray, adv: np.ndarray, logp: np.ndarray) -> None:
    """One RL step on the group's answers `ys` sampled by the policy whose log-probs are `logp`."""
    g, n = len(ys), len(PROMPT) + 1
    tokens = np.concatenate([np.tile(PROMPT, (g, 1)), ys[:, None]], axis=1).astype(np.int32)
    mask = np.zeros((g, n), np.int32)
    mask[:, -1] = 1
    batch = {"tokens": tokens, "positions": np.tile(np.arange(n, dtype=np.int32), (g, 1)),
             "segment_ids": np.ones((g, n), np.int32), "loss_mask": mask,
             "logprobs": np.where(mask > 0, logp[tokens], 0.0).astype(np.float32),
             "advantages": (mask * np.asarray(adv, np.float32)[:, None]).astype(np.float32)}
    if self.logp_fn is not None:
      batch["prox_logp"] = np.asarray(self.logp_fn(self.state, batch))
    self.state = self.step(self.state, self.ref, batch)[0]

  def imitate(self, steps: int = 30) -> float:
    """SFT-like start: A and B equally (advantage 1 on each); returns P(A) after."""
    both = np.array([ARM_A, ARM_B] * (GROUP // 2))
    for _ in range(steps):
      self.update(both, np.ones(GROUP), self.policy())
    return float(np.exp(self.policy())[ARM_A])

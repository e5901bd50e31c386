"""Shared MoE test operands: tokens, routing weights and SwiGLU expert weights of one size."""

import jax

N, D, F, E, K = 48, 16, 8, 8, 2  # Tokens, model dim, expert hidden dim, experts, top-k.


def expert_operands(keys: jax.Array) -> tuple[jax.Array, ...]:
  """(x [N, D], w [N, K], wg [E, D, F], wu [E, D, F], wd [E, F, D]) from keys 0 and 2..5 of
  `keys` (6 keys; key 1 is left to the caller's routing choice)."""
  x = jax.random.normal(keys[0], (N, D))
  w = jax.random.uniform(keys[2], (N, K))
  wg = jax.random.normal(keys[3], (E, D, F)) / 4
  wu = jax.random.normal(keys[4], (E, D, F)) / 4
  wd = jax.random.normal(keys[5], (E, F, D)) / 4
  return x, w, wg, wu, wd

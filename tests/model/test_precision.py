"""The compute-dtype policy: which leaves are cast, fp32 gradients through it, and that a forward
on policy-cast params equals the fp32 masters' forward with model.dtype=bf16 (the server's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.inference import reload
from klong_jax.model import precision
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer
from klong_jax.train import optim
from klong_jax.train import step as step_lib


@pytest.fixture(scope="module")
def model():
  cfg = get_preset("tiny").replace(dtype="bfloat16")
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _dtypes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): x.dtype for p, x in flat}


def test_policy_keeps_router_bias_norms_fp32(model):
  state = nnx.state(model, nnx.Not(nnx.RngState))
  cast = _dtypes(precision.cast_params(state, "bfloat16"))
  kept = [k for k in cast if any(w in k for w in ("router", "bias", "scale"))]
  assert any("router_de" in k for k in kept) and any("expert_bias_e" in k for k in kept)
  assert any("final_norm" in k for k in kept) and any("q_bias_nh" in k for k in kept)
  for k, d in cast.items():
    assert d == (jnp.float32 if k in kept else jnp.bfloat16), k
  assert {d for d in _dtypes(precision.cast_params(state, "float32")).values()} == {
      jnp.dtype(jnp.float32)}
  # A pure dict (policy checkpoints) gets the same dtypes as the State.
  pure = _dtypes(precision.cast_params(state.to_pure_dict(), jnp.bfloat16))
  assert sorted(str(d) for d in pure.values()) == sorted(str(d) for d in cast.values())


def test_bf16_policy_bundle_keeps_router_fp32(model, tmp_path):
  reload.save_policy(tmp_path, 0, model, dtype=jnp.bfloat16)
  tree = reload.params_dict(model)
  saved = _dtypes(reload._cast(tree, jnp.bfloat16))
  assert saved["['moe_layers']['mlp']['router_de']"] == jnp.float32
  assert saved["['moe_layers']['mlp']['gate_edf']"] == jnp.bfloat16
  back = reload.load_policy(tmp_path / "0", model)  # Loads into the fp32 model.
  np.testing.assert_array_equal(back["moe_layers"]["mlp"]["router_de"],
                                tree["moe_layers"]["mlp"]["router_de"])


def test_policy_forward_equals_fp32_masters_and_grads_stay_fp32(model):
  graphdef, params, rest = step_lib.split_model(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 24)), jnp.int32)
  pos = jnp.tile(jnp.arange(24), (2, 1))

  def logits(p):
    return nnx.merge(graphdef, p, rest)(tokens, pos)[0]

  masters = logits(params)  # What the server computes: fp32 weights, bf16 compute.
  np.testing.assert_array_equal(logits(optim.cast_for_compute(params, "bfloat16")), masters)
  old = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert np.abs(np.asarray(logits(old) - masters)).max() > 0  # The all-bf16 cast differs.

  def loss(p):
    return jnp.mean(logits(optim.cast_for_compute(p, "bfloat16")) ** 2)

  grads = jax.grad(loss)(params)
  assert set(_dtypes(grads).values()) == {jnp.dtype(jnp.float32)}
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

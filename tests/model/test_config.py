"""Model config validation, presets (and their ml_collections twins), parameter counts."""

import dataclasses

import pytest

from configs import common, glm45_air, qwen3_moe, small, tiny
from klong_jax.model.config import ConfigError, ModelConfig, from_config_dict, get_preset
from klong_jax.model.params import count_params


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(first_k_dense=4), "first_k_dense"),
    (dict(router_score="relu"), "router_score"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(dtype="int8"), "dtype"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
])
def test_malformed_config_names_field(changes, field):
  with pytest.raises(ConfigError, match=repr(field)) as err:
    dataclasses.replace(get_preset("tiny"), **changes).validate()
  assert err.value.field == field


def test_from_config_dict_rejects_unknown_field_and_validates():
  section = tiny.get_config().model
  section.num_experts_per_tok = 99
  with pytest.raises(ConfigError, match="num_experts_per_tok"):
    from_config_dict(section)
  with pytest.raises(ConfigError, match="num_expertz"):
    from_config_dict({"num_expertz": 4})
  with pytest.raises(ConfigError, match="preset"):
    get_preset("gpt5")


@pytest.mark.parametrize("module,name", [(tiny, "tiny"), (small, "small"),
                                         (glm45_air, "glm45_air"), (qwen3_moe, "qwen3_moe")])
def test_config_files_match_presets(module, name):
  # The pod preset config runs its MoE in 4096-token chunks with full remat (configs/glm45_air.py).
  pod = name == "glm45_air"
  assert from_config_dict(module.get_config().model) == get_preset(name).replace(
      moe_token_chunk=4096 if pod else 0, remat_policy="full" if pod else "none")
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  assert set(common.model_config(name)) == names


def test_config_arg_overrides():
  cfg = from_config_dict(tiny.get_config("scan=0,remat=full,dtype=bfloat16").model)
  assert (cfg.scan_layers, cfg.remat_policy, cfg.dtype) == (False, "full", "bfloat16")
  with pytest.raises(ValueError, match="bogus"):
    tiny.get_config("bogus=1")


def test_glm45_air_param_counts():
  total, active = count_params(get_preset("glm45_air"))
  print(f"glm45_air: total={total / 1e9:.2f}B active={active / 1e9:.2f}B")
  assert abs(total / 106e9 - 1) < 0.03
  assert abs(active / 12e9 - 1) < 0.03


def test_tiny_counts_are_consistent():
  cfg = get_preset("tiny")
  total, active = count_params(cfg)
  routed = cfg.num_moe_layers * 3 * cfg.num_experts * cfg.hidden_size * cfg.moe_intermediate_size
  vocab = 2 * cfg.vocab_size * cfg.hidden_size
  assert total - active == vocab + routed * (cfg.num_experts - cfg.num_experts_per_tok) // (
      cfg.num_experts)

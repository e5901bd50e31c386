"""The one `k=v` parser and config loader (klong_jax/config_util.py)."""

from __future__ import annotations

import ml_collections
import pytest

from klong_jax import config_util as cu


@pytest.mark.parametrize("text,want", [("", True), ("1", True), ("true", True), ("Yes", True),
                                       ("on", True), ("0", False), ("false", False),
                                       ("No", False), ("off", False)])
def test_bools(text, want):
  assert cu.parse_bool(text) is want


def test_bad_bool_names_the_key():
  with pytest.raises(ValueError, match="runlocal='maybe'"):
    cu.parse_arg("runlocal=maybe", runlocal=False)


def test_parse_arg_is_typed_and_runlocal_0_is_off():
  a = cu.parse_arg("steps=7,runlocal=0,lr=2e-4,mode=sync", steps=1, runlocal=True, lr=1.0,
                   mode="async")
  assert (a.steps, a.runlocal, a.lr, a.mode) == (7, False, 2e-4, "sync")
  assert cu.parse_arg("runlocal", runlocal=False).runlocal is True
  assert cu.parse_arg(None, steps=3).steps == 3
  with pytest.raises(cu.ConfigKeyError, match=r"'stpes' unknown; valid: \['steps'\]"):
    cu.parse_arg("stpes=3", steps=1)
  with pytest.raises(ValueError, match="steps='x' is not a int"):
    cu.parse_arg("steps=x", steps=1)
  with pytest.raises(ValueError, match="needs a value"):
    cu.parse_arg("steps", steps=1)


def test_items_need_a_separator():
  assert cu.parse_kv(" a=1 , b=x ") == {"a": "1", "b": "x"}
  with pytest.raises(ValueError, match="key=value"):
    cu.parse_kv("oops")


def test_mesh_one_parser_fill_optional():
  assert cu.parse_mesh("fsdp:-1,expert:8") == {"fsdp": -1, "expert": 8}
  assert cu.parse_mesh("") == {}
  with pytest.raises(ValueError, match="size >= 1, e.g."):
    cu.parse_mesh("fsdp:-1", allow_fill=False)
  for bad in ("fsdp=8", "fsdp:0", "fsdp:x", "pipeline:2", "fsdp:-2"):
    with pytest.raises(ValueError, match="axis:size"):
      cu.parse_mesh(bad)
  with pytest.raises(ValueError, match="at most one axis"):
    cu.parse_mesh("fsdp:-1,data:-1")


def test_floats():
  assert cu.parse_floats("a=0.3, b=1") == {"a": 0.3, "b": 1.0}
  with pytest.raises(ValueError, match="is not KEY=NUMBER"):
    cu.parse_floats("a=high")


def _cfg() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(seed=0, rl=dict(mode="async", lr=1e-3, sync=False,
                                                        stages=[1, 2])))


def test_overrides_typed_by_the_field_and_copy():
  c = _cfg()
  c2 = cu.apply_overrides(c, "seed=3,rl.lr=2e-4,rl.sync=no,rl.mode=sync,rl.stages=[3]")
  assert (c2.seed, c2.rl.lr, c2.rl.sync, c2.rl.mode, list(c2.rl.stages)) == (
      3, 2e-4, False, "sync", [3])
  assert c.seed == 0
  nested = cu.apply_overrides(c, {"rl": {"lr": 0.5}, "seed": 2})
  assert (nested.rl.lr, nested.seed) == (0.5, 2)


def test_unknown_override_names_key_and_valid_keys():
  with pytest.raises(cu.ConfigKeyError, match=r"'rl.lrr': no field 'lrr'; valid: \['lr'"):
    cu.apply_overrides(_cfg(), "rl.lrr=1")
  with pytest.raises(KeyError, match="no section 'r'"):
    cu.apply_overrides(_cfg(), {"r.lr": 1})


def test_load_config_file_arg_and_overrides():
  c = cu.load_config("configs/sft_tiny.py:steps=5,runlocal=0", overrides="optim.lr=0.5")
  assert (c.train.steps, c.optim.total_steps, c.optim.lr, c.data.synthetic_count) == (
      5, 5, 0.5, 256)
  assert cu.load_config("configs/sft_tiny.py", "runlocal").train.steps == 6
  with pytest.raises(FileNotFoundError, match="nope.py"):
    cu.load_config("configs/nope.py")
  with pytest.raises(ValueError, match="unknown"):
    cu.load_config("configs/sft_tiny.py:stesp=3")


def test_flatten_and_flag_overrides():
  assert cu.flatten({"a": {"b": 1}, "c": "x"}) == {"a.b": 1, "c": "x"}
  assert cu.overrides_dict("a.b=1") == {"a.b": "1"}
  assert cu.overrides_dict(None) == {}


def test_arg_sections_render_to_arg_strings_that_parse_back():
  args = ml_collections.ConfigDict(dict(steps=6, runlocal=True, lr=2e-4, limits="15:30:60",
                                        off=False))
  text = cu.format_arg(args)
  assert text == "limits=15:30:60,lr=0.0002,off=0,runlocal,steps=6"
  back = cu.parse_arg(text, steps=1, runlocal=False, lr=1.0, limits="", off=True)
  assert back.to_dict() == args.to_dict()
  assert cu.format_arg(None) == cu.format_arg({}) == ""

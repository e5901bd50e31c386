"""The one `k=v,...` parser and the one config loader (no JAX: fleet hosts import this).

Every comma list in the repo goes through `parse_items` (config arg strings, `--config` overrides,
sweep sets, `--mesh=fsdp:-1,expert:8`, teacher mistake rates), and every value through
`parse_value`, typed by the field it replaces: bools read "1/true/yes/on" and "0/false/no/off"
(a bare `k` = true), ints and floats parse as such, anything else untyped is a Python literal or
a string. `load_config("configs/x.py:arg", overrides)` is `get_config(arg)` of a config file plus
dotted-key overrides; an unknown key fails naming it and the valid keys.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections

# "context": context parallelism (a row's sequence sharded over it; rules.py `act_seq`).
MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")
TRUE = ("", "1", "true", "yes", "on")  # "" = a bare flag (`runlocal`).
FALSE = ("0", "false", "no", "off")


class ConfigKeyError(KeyError, ValueError):
  """An override or arg key the config does not have; the message lists the valid keys."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


def parse_bool(text: str | bool, key: str = "value") -> bool:
  """'1/true/yes/on/""' -> True, '0/false/no/off' -> False; anything else raises."""
  if isinstance(text, bool):
    return text
  low = str(text).strip().lower()
  if low in TRUE:
    return True
  if low in FALSE:
    return False
  raise ValueError(f"{key}={text!r} is not a bool; use one of {TRUE[1:] + FALSE}")


def parse_literal(text: str) -> Any:
  """A Python literal (`3`, `2e-4`, `[1, 2]`, `True`) if `text` is one, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: Any, like: Any = None, key: str = "value") -> Any:
  """`text` converted to the type of `like` (the field's current value); untyped: a literal."""
  if not isinstance(text, str):
    if isinstance(like, bool) and not isinstance(text, bool):
      return parse_bool(str(text), key)
    return text
  try:
    if isinstance(like, bool):
      return parse_bool(text, key)
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
  except ValueError:
    raise ValueError(f"{key}={text!r} is not a {type(like).__name__}") from None
  if isinstance(like, str):
    return text
  return parse_literal(text)


def parse_items(text: str | None, sep: str = "=", *, bare: bool = False,
                example: str = "k=v,k2=v2", form: str = "") -> list[tuple[str, str]]:
  """'a=1, b=x' -> [('a', '1'), ('b', 'x')]; a bare `k` is ('k', '') when `bare`, else raises."""
  out = []
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    key, found, value = item.partition(sep)
    key = key.strip()
    if not key or (not found and not bare):
      raise ValueError(f"{item!r} in {text!r} must look like {form or 'key' + sep + 'value'} "
                       f"(e.g. {example!r})")
    out.append((key, value.strip()))
  return out


def parse_kv(text: str | None, sep: str = "=", *, bare: bool = False) -> dict[str, str]:
  """'a=1,b=x' -> {'a': '1', 'b': 'x'} (strings; type them with `parse_value`)."""
  return dict(parse_items(text, sep, bare=bare))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """A config file's arg string 'k1=v1,flag' typed by `defaults` (which also lists the keys)."""
  parsed = ml_collections.ConfigDict(defaults)
  for key, value in parse_items(arg, bare=True):
    if key not in defaults:
      raise ConfigKeyError(f"config arg {key!r} unknown; valid: {sorted(defaults)}")
    like = defaults[key]
    if value == "" and isinstance(like, int | float) and not isinstance(like, bool):
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    parsed[key] = parse_value(value, like, key)
  return parsed


def format_value(value: Any) -> str:
  """A value as `parse_value` reads it back (floats by repr, so no digit is lost)."""
  return repr(value) if isinstance(value, float) else str(value)


def format_arg(args: Mapping[str, Any] | Any | None) -> str:
  """A config file's arg section -> its arg string: {'steps': 9, 'runlocal': True} ->
  'runlocal,steps=9' (a true bool as a bare flag, a false one as k=0); '' for None or {}."""
  if args is None or isinstance(args, str):
    return args or ""
  items = args.items() if hasattr(args, "items") else dict(args).items()
  out = []
  for key, value in items:
    if isinstance(value, bool):
      out.append(key if value else f"{key}=0")
    else:
      out.append(f"{key}={format_value(value)}")
  return ",".join(out)


def parse_floats(text: str | None, what: str = "rates", example: str = "a=0.3,b=0.5",
                 form: str = "KEY=NUMBER") -> dict[str, float]:
  """'a=0.3,b=0.5' -> {'a': 0.3, 'b': 0.5}; an item that is not `form` raises naming it."""
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    key, _, value = item.partition("=")
    try:  # float("") also rejects a bare KEY.
      out[key.strip()] = float(value)
    except ValueError:
      raise ValueError(f"{what} {text!r}: {item!r} is not {form} (e.g. {example!r})") from None
  return out


def parse_mesh(spec: str | None, *, allow_fill: bool = True) -> dict[str, int]:
  """'fsdp:-1,expert:8' -> {'fsdp': -1, 'expert': 8} (named axes only; '' -> {}).

  Sizes are >= 1, or -1 (one axis: the remaining devices) when `allow_fill`.
  """
  example = "fsdp:-1,expert:8" if allow_fill else "fsdp:64,expert:8,tensor:4"
  sizes: dict[str, int] = {}
  for name, value in parse_items(spec, ":", example=example, form="axis:size"):
    try:
      size = int(value)
    except ValueError:
      size = 0
    if name not in MESH_AXES or not (size >= 1 or (allow_fill and size == -1)):
      allowed = "size >= 1 or -1 (the rest)" if allow_fill else "size >= 1"
      raise ValueError(f"--mesh item {name}:{value}: expected axis:size with axis in "
                       f"{sorted(MESH_AXES)} and {allowed}, e.g. --mesh={example}")
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"--mesh={spec}: at most one axis may be -1")
  return sizes


def to_config(value: Any) -> ml_collections.ConfigDict:
  """A ConfigDict copy of a ConfigDict or a mapping."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return ml_collections.ConfigDict(dict(value))


def flatten(tree: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} (or a ConfigDict) -> {'a.b': 1}."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def overrides_dict(overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
  """Overrides as {'a.b': value}: from 'a.b=1,c=x', a flat dict, or a nested ConfigDict."""
  if overrides is None:
    return {}
  if isinstance(overrides, str):
    return parse_kv(overrides)
  return flatten(overrides)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: str | Mapping[str, Any] | None,
                    what: str = "override") -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides, each typed by the field it replaces.

  An unknown section or field raises ConfigKeyError naming the key and the valid ones.
  """
  config = to_config(config)
  for key, value in overrides_dict(overrides).items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      if p not in node or not hasattr(node[p], "keys"):
        raise ConfigKeyError(f"{what} key {key!r}: no section {p!r}; valid: "
                             f"{sorted(node.keys())}")
      node = node[p]
    if leaf not in node:
      raise ConfigKeyError(f"{what} key {key!r}: no field {leaf!r}; valid: {sorted(node.keys())}")
    node[leaf] = parse_value(value, node[leaf], key)
  return config


def config_path(spec: str) -> tuple[str, str]:
  """'configs/x.py:arg' -> ('configs/x.py', 'arg'), as absl's `--config=file:arg`."""
  path, _, arg = spec.partition(":")
  return path, arg


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file (the repo root is made importable for `configs.*`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (paths are relative to the repo "
                            "root)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.isdir(os.path.join(root, "configs")) and root not in sys.path:
    sys.path.insert(0, root)
  name = f"_klong_cfg_{os.path.splitext(os.path.basename(path))[0]}_{abs(hash(path))}"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path} cannot be loaded; check the path")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def load_config(spec: str, arg: str | None = None,
                overrides: str | Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' -> get_config(arg) with `overrides` applied (`--config.k=v` alike).

  `arg`, when given, replaces the arg of `spec`.
  """
  path, spec_arg = config_path(spec)
  config = load_config_file(path, arg if arg is not None else spec_arg)
  return apply_overrides(config, overrides) if overrides else config

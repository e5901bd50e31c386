"""Reference chat templates (GLM-4.5, Qwen3; see NOTICE), the one builder of tokenizer dirs shaped
like theirs (make_tokenizer_dirs.py), and a reference rendering as transformers renders them."""

import json
import pathlib

from klong_jax.data import tokenizer as tok_lib

TEMPLATES = pathlib.Path(__file__).parent


def build_family_dirs(out: pathlib.Path) -> dict[str, str]:
  """GLM-4.5- and Qwen3-shaped tokenizer dirs under `out` (BPE on the bundled corpus)."""
  from tests.data.chat_templates import make_tokenizer_dirs  # noqa: PLC0415
  corpus = out / "corpus.txt"
  corpus.write_text(tok_lib.BUNDLED_CORPUS.read_text(encoding="utf-8")
                    + "\nRésumé ünïcode 😀 日本語 данные\n", encoding="utf-8")
  return {f: make_tokenizer_dirs.build(str(corpus), str(out), f)
          for f in make_tokenizer_dirs.FAMILIES}


def template(family: str) -> str:
  return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def render(family, messages, tools=None, **kw) -> str:
  """`family`'s template rendered as transformers renders chat templates (sandboxed, trimmed
  blocks, tojson without ASCII escapes), independent of klong_jax.data.chat_template."""
  import jinja2.ext  # noqa: PLC0415
  import jinja2.sandbox  # noqa: PLC0415
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  return env.from_string(template(family)).render(messages=messages, tools=tools, **kw)

"""Reference chat templates (GLM-4.5, Qwen3) and a builder of tokenizer dirs shaped like theirs."""

import pathlib

from klong_jax.data import tokenizer as tok_lib


def build_family_dirs(out: pathlib.Path) -> dict[str, str]:
  """GLM-4.5- and Qwen3-shaped tokenizer dirs under `out` (BPE on the bundled corpus)."""
  from tests.data.chat_templates import make_tokenizer_dirs  # noqa: PLC0415
  corpus = out / "corpus.txt"
  corpus.write_text(tok_lib.BUNDLED_CORPUS.read_text(encoding="utf-8")
                    + "\nRésumé ünïcode 😀 日本語 данные\n", encoding="utf-8")
  return {f: make_tokenizer_dirs.build(str(corpus), str(out), f)
          for f in make_tokenizer_dirs.FAMILIES}

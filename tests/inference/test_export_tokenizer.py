"""Exports carry the tokenizer, chat template and generation config: the HF dir of a serving
bundle and of `hf_convert --export` load in transformers as is and render as ChatFormat does."""

import json
import shutil

import pytest

from klong_jax.data import tokenizer as tokenizer_lib
from klong_jax.data.chat import ChatFormat
from klong_jax.inference import export, hf_convert
from klong_jax.model import hf as hf_lib
from tests.data.chat_templates import build_family_dirs
from tests.data.test_chat_template import TOOLS, agent_conversation

transformers = pytest.importorskip("transformers")
CHAT_FILES = ["chat_template.jinja", "generation_config.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
  return build_family_dirs(tmp_path_factory.mktemp("families"))["glm45"]


def _same_rendering(model_dir, reference_dir):
  hf = transformers.AutoTokenizer.from_pretrained(model_dir)
  msgs = agent_conversation()
  want = ChatFormat(tokenizer_lib.load(reference_dir)).render(msgs, TOOLS).tokens.tolist()
  assert hf.apply_chat_template(msgs, tools=TOOLS, tokenize=True, return_dict=False) == want
  assert ChatFormat(tokenizer_lib.load(model_dir)).render(msgs, TOOLS).tokens.tolist() == want


def test_bundle_carries_tokenizer_and_chat_files(tiny_model, tiny_cfg, tok, glm_dir, tmp_path):
  b = export.write_bundle(tmp_path / "glm", tiny_model, tiny_cfg, glm_dir)
  for d in (b, b / "hf"):
    names = {p.name for p in d.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    _same_rendering(d, glm_dir)
  loaded = export.load_bundle(b)
  assert loaded.chat_format == "template"
  fmt = ChatFormat(tokenizer_lib.load(loaded.tokenizer_path))
  assert fmt.stop_token_ids == sorted(json.loads(
      (tmp_path / "glm" / "generation_config.json").read_text())["eos_token_id"])
  # The bundled klong tokenizer (a bare .model path) gets its chat files written.
  k = export.write_bundle(tmp_path / "klong", tiny_model, tiny_cfg, tok.path, hf=True)
  for d in (k, k / "hf"):
    assert set(CHAT_FILES) <= {p.name for p in d.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "list files"}]
    assert hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == ChatFormat(tok).render_prompt(msgs)


def test_hf_convert_round_trip_keeps_the_tokenizer(tiny_model, tiny_cfg, glm_dir, tmp_path):
  src = hf_lib.export_hf(tiny_model, tiny_cfg, tmp_path / "src")
  for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copyfile(f"{glm_dir}/{f}", src / f)
  hf_convert.convert_import(src, tmp_path / "policy")
  assert (tmp_path / "policy" / hf_convert.TOKENIZER_DIR / "tokenizer.json").is_file()
  back = hf_convert.convert_export(tmp_path / "policy" / "0", tmp_path / "back")
  assert json.loads((back / "generation_config.json").read_text()) == json.loads(
      (src / "generation_config.json").read_text())
  _same_rendering(back, glm_dir)
  other = hf_convert.convert_export(tmp_path / "policy", tmp_path / "other", tokenizer=glm_dir)
  _same_rendering(other, glm_dir)

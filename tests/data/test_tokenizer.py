"""Tokenizer loading, round trips, chat special tokens and clear errors for bad files."""

import json
import pathlib
import subprocess
import sys

import pytest

from klong_jax.data import tokenizer


def test_sentencepiece_roundtrip_and_specials(tok):
  text = "def f(x):\n\treturn x + 1  # ünïcode 😀\n$ ls -la\n  total 42"
  assert tok.decode(tok.encode(text)) == text  # identity normalisation, byte fallback
  ids = [tok.special_id(s) for s in tokenizer.CHAT_SPECIAL_TOKENS]
  assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
  for s, i in zip(tokenizer.CHAT_SPECIAL_TOKENS, ids, strict=True):
    assert tok.encode(s) == [i]
  assert tok.pad_id == 0 and tok.eos_id == 3 and tok.vocab_size == 1024


def test_default_tokenizer_is_cached(tmp_path):
  a = tokenizer.default_tokenizer(tmp_path, vocab_size=512)
  d = pathlib.Path(a.chat_dir)
  mtime = pathlib.Path(a.path).stat().st_mtime_ns
  b = tokenizer.default_tokenizer(tmp_path, vocab_size=512)
  assert b.path == a.path and pathlib.Path(a.path).stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp leftovers
  assert sorted(p.name for p in d.iterdir()) == [  # the klong chat format travels with it
      "chat_template.jinja", "generation_config.json", "tokenizer.model", "tokenizer_config.json"]
  assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == sorted(
      {a.special_id("<|end|>"), a.eos_id})


def test_missing_and_corrupt_files_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer.load(tmp_path / "nope.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x00garbage" * 10)
  with pytest.raises(tokenizer.TokenizerError, match="bad.model"):
    tokenizer.load(bad)
  badj = tmp_path / "tokenizer.json"
  badj.write_text("{not json")
  with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json"):
    tokenizer.load(badj)
  odd = tmp_path / "vocab.txt"
  odd.write_text("x")
  with pytest.raises(tokenizer.TokenizerError, match="unknown type"):
    tokenizer.load(odd)


def _train_hf(tmp_path, specials):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE(unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", *specials],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator([tokenizer.BUNDLED_CORPUS.read_text()[:50000]], trainer)
  path = tmp_path / "tokenizer.json"
  t.save(str(path))
  return path


def test_hf_tokenizer_json(tmp_path):
  path = _train_hf(tmp_path, list(tokenizer.CHAT_SPECIAL_TOKENS))
  tok = tokenizer.load(path)
  assert isinstance(tok, tokenizer.HFTokenizer)
  text = "Step 3: run `python main.py --seed 7`<|end|>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids[-1] == tok.special_id("<|end|>")
  assert tok.pad_id == 0 and tok.eos_id == 1
  assert tokenizer.load(tmp_path).path == str(path)  # a directory holding tokenizer.json


def test_hf_tokenizer_without_chat_specials_names_missing_token(tmp_path):
  tok = tokenizer.load(_train_hf(tmp_path, []))
  with pytest.raises(tokenizer.TokenizerError, match=r"<\|assistant\|>"):
    tok.special_id("<|assistant|>")


@pytest.mark.subprocess
def test_fleet_modules_do_not_import_jax():
  code = ("import sys; import klong_jax.data.tokenizer, klong_jax.data.chat, "
          "klong_jax.data.render, klong_jax.data.shards, klong_jax.data.schema, "
          "klong_jax.data.synthetic, klong_jax.data.splitting, klong_jax.data.packing; "
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'flax', 'grain'))))")
  out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                       text=True, check=True)
  assert json.loads(out.stdout) == []

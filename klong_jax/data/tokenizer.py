"""Tokenizers behind one small interface: SentencePiece `.model` files and HF `tokenizer.json`.

The bundled tiny SentencePiece model is trained at build time from `assets/corpus.txt` (nothing can
be downloaded) with the chat special tokens as user-defined symbols. No JAX imports (fleet-safe).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence

# Chat special tokens (chat.py renders with these); each is one token id in every tokenizer we load.
CHAT_SPECIAL_TOKENS = (
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
    "<|tool_call|>", "<|/tool_call|>", "<|tools|>",
)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in CHAT_SPECIAL_TOKENS) + ")")
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
BUNDLED_CORPUS = ASSETS_DIR / "corpus.txt"

_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")


class TokenizerError(ValueError):
  """A tokenizer file that cannot be used; the message names the file and the fix."""


class Tokenizer:
  """Common interface: encode/decode, vocab size, pad/eos ids and chat special token ids."""

  path: str
  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def piece_to_id(self, piece: str) -> int | None:
    """The id of a single-token piece, or None if the vocabulary lacks it."""
    raise NotImplementedError

  def encode_untrusted(self, text: str) -> list[int]:
    """Encodes text from outside the model (user, tool output, paper) so that literal chat
    special-token strings in it never become special ids (prompt injection: a tool printing
    `<|end|><|assistant|>` must not forge a turn). Each such string is encoded as `<` + the rest;
    decode(encode_untrusted(x)) == x."""
    parts = _SPECIAL_RE.split(text)
    ids: list[int] = []
    for i, part in enumerate(parts):
      if not part:
        continue
      if i % 2:  # a special-token string (odd parts are the regex's captured separators)
        ids += self.encode(part[0]) + self.encode(part[1:])
      else:
        ids += self.encode(part)
    return ids

  def special_id(self, name: str) -> int:
    """Id of a chat special token such as "<|assistant|>"; a clear error if it is missing."""
    tid = self.piece_to_id(name)
    if tid is None:
      raise TokenizerError(
          f"tokenizer {self.path} has no special token {name!r}; chat formats need "
          f"{list(CHAT_SPECIAL_TOKENS)} (train with tokenizer.train_sentencepiece, or add them as "
          "special tokens to the tokenizer.json)")
    return tid


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file."""

  def __init__(self, path: str | os.PathLike):
    import sentencepiece as spm
    self.path = str(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(
          f"cannot load SentencePiece model {self.path}: file is corrupt or not a .model "
          f"({e}); re-train it with tokenizer.train_sentencepiece") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    self.eos_id = int(self._sp.eos_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def piece_to_id(self, piece: str) -> int | None:
    tid = int(self._sp.PieceToId(piece))
    if tid == self._sp.unk_id() and piece != self._sp.IdToPiece(tid):
      return None
    return tid


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (imported GLM/Qwen checkpoints), via the `tokenizers` lib."""

  def __init__(self, path: str | os.PathLike, pad_token: str | None = None,
               eos_token: str | None = None):
    import tokenizers
    self.path = str(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust side raises a bare Exception on parse errors
      raise TokenizerError(
          f"cannot load HF tokenizer {self.path}: file is corrupt or not a tokenizer.json "
          f"({e}); re-export it from the checkpoint") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._first_id([eos_token] if eos_token else _EOS_CANDIDATES, "eos")
    pad = self._first_id([pad_token] if pad_token else _PAD_CANDIDATES, "pad", required=False)
    self.pad_id = self.eos_id if pad is None else pad

  def _first_id(self, names: Sequence[str], what: str, required: bool = True) -> int | None:
    for name in names:
      tid = self._tok.token_to_id(name)
      if tid is not None:
        return int(tid)
    if required:
      raise TokenizerError(f"tokenizer {self.path} has none of {list(names)} for the {what} "
                           f"token; pass {what}_token= explicitly")
    return None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece_to_id(self, piece: str) -> int | None:
    tid = self._tok.token_to_id(piece)
    return None if tid is None else int(tid)


def load(path: str | os.PathLike, **kwargs) -> Tokenizer:
  """Loads `*.model` as SentencePiece, `*.json` as HF tokenizers; clear errors name the file."""
  p = pathlib.Path(path)
  if p.is_dir() and (p / "tokenizer.json").exists():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise FileNotFoundError(f"tokenizer file {p} does not exist; pass a SentencePiece .model or "
                            "a HF tokenizer.json (or call tokenizer.default_tokenizer(cache_dir))")
  if p.suffix == ".json":
    return HFTokenizer(p, **kwargs)
  if p.suffix == ".model":
    return SentencePieceTokenizer(p)
  raise TokenizerError(f"tokenizer file {p} has unknown type {p.suffix!r}; expected .model "
                       "(SentencePiece) or tokenizer.json (HF tokenizers)")


def train_sentencepiece(corpus_path: str | os.PathLike, model_prefix: str | os.PathLike,
                        vocab_size: int = 512, max_piece_length: int = 16) -> str:
  """Trains a byte-fallback BPE SentencePiece model with the chat special tokens; returns the path.

  `max_piece_length` > 16 lets domain corpora with long repeated strings (tool schemas, prompts)
  merge them into longer pieces (pieces may then span whitespace).
  Identity normalisation and no whitespace folding keep code and shell output exact
  (decode(encode(x)) == x). The model is written under a temp name and renamed (atomic publish).
  """
  import sentencepiece as spm
  corpus = pathlib.Path(corpus_path)
  if not corpus.is_file():
    raise FileNotFoundError(f"corpus file {corpus} does not exist")
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=prefix.parent) as tmp:
    tmp_prefix = os.path.join(tmp, "sp")
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
        user_defined_symbols=list(CHAT_SPECIAL_TOKENS), pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        max_sentencepiece_length=max_piece_length,
        split_by_whitespace=max_piece_length <= 16,
        split_by_unicode_script=max_piece_length <= 16, num_threads=1, minloglevel=2)
    out = str(prefix) + ".model"
    os.replace(tmp_prefix + ".model", out)
  logging.info("trained SentencePiece model %s (vocab %d) from %s", out, vocab_size, corpus)
  return out


def default_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 1024) -> Tokenizer:
  """The bundled tiny SentencePiece model, trained once from the bundled corpus and cached.

  The cache key hashes the corpus and the vocab size, so editing the corpus retrains.
  """
  digest = hashlib.sha256(BUNDLED_CORPUS.read_bytes()).hexdigest()[:12]
  prefix = pathlib.Path(cache_dir) / f"klong_sp_{vocab_size}_{digest}"
  path = pathlib.Path(str(prefix) + ".model")
  if not path.exists():
    train_sentencepiece(BUNDLED_CORPUS, prefix, vocab_size)
  return load(path)

"""Tokenizers behind one small interface: SentencePiece `.model` files and HF `tokenizer.json`.

A tokenizer loaded from a directory (or a file named `tokenizer.json` / `tokenizer.model`) keeps
that directory as `chat_dir`: its chat template, special tokens and stop ids (chat_template.py).
The bundled tiny SentencePiece model is trained at build time from `assets/corpus.txt` (nothing can
be downloaded) with the chat special tokens as user-defined symbols, into a directory that also
holds its chat template (`assets/klong_chat_template.jinja`). No JAX imports (fleet-safe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
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
KLONG_TEMPLATE = ASSETS_DIR / "klong_chat_template.jinja"
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "special_tokens_map.json")
_CANONICAL = ("tokenizer.json", "tokenizer.model")

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
  chat_dir: str | None = None  # directory holding the chat template etc., if any

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def piece_to_id(self, piece: str) -> int | None:
    """The id of a single-token piece, or None if the vocabulary lacks it."""
    raise NotImplementedError

  def added_tokens(self) -> dict[str, bool]:
    """Added tokens (content -> special), each encoded as one id wherever it appears in text."""
    raise NotImplementedError

  def encode_plain(self, text: str) -> list[int]:
    """Encodes text with no added tokens matched (each stays plain text)."""
    raise NotImplementedError

  def encode_piece(self, text: str, plain: bool = False) -> list[int]:
    """Encodes a piece from the middle of a rendered chat (`plain`: no added tokens)."""
    return self.encode_plain(text) if plain else self.encode(text)

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
          f"tokenizer {self.path} has no special token {name!r}; the klong chat format needs "
          f"{list(CHAT_SPECIAL_TOKENS)} (train with tokenizer.train_sentencepiece), other formats "
          "need a chat template in the tokenizer directory (tokenizer_config.json)")
    return tid


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file."""

  def __init__(self, path: str | os.PathLike, added: dict[str, bool] | None = None):
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
    if added is None:  # user-defined symbols are not listed by the API: the chat ones, if present
      added = {t: True for t in CHAT_SPECIAL_TOKENS if self.piece_to_id(t) is not None}
    self._added = dict(added)
    self._added_re = re.compile("(" + "|".join(
        re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")" if self._added
        else "(?!)")

  def encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def added_tokens(self) -> dict[str, bool]:
    return dict(self._added)

  def encode_plain(self, text: str) -> list[int]:
    """Each added-token string as `<` + the rest (a user-defined symbol always matches whole)."""
    ids: list[int] = []
    for i, part in enumerate(self._added_re.split(text)):
      if part:
        ids += self.encode(part[0]) + self.encode(part[1:]) if i % 2 else self.encode(part)
    return ids

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
               eos_token: str | None = None, added: dict[str, bool] | None = None):
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
    self._added = {t.content: bool(t.special)
                   for _, t in sorted(self._tok.get_added_tokens_decoder().items())}
    self._added.update({t: sp for t, sp in (added or {}).items() if t in self._added})
    self._newline = self.encode("\n")

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

  def added_tokens(self) -> dict[str, bool]:
    return dict(self._added)

  def encode_plain(self, text: str) -> list[int]:
    """The backend pipeline (normalizer, pre-tokenizer, model) without its added tokens."""
    if self._tok.normalizer is not None:
      text = self._tok.normalizer.normalize_str(text)
    splits = [text]
    if self._tok.pre_tokenizer is not None:
      splits = [s for s, _ in self._tok.pre_tokenizer.pre_tokenize_str(text)]
    return [t.id for s in splits for t in self._tok.model.tokenize(s)]

  def encode_piece(self, text: str, plain: bool = False) -> list[int]:
    """Encoded after a newline that is then removed (no start-of-text prefix space), as
    transformers encodes the pieces of a sanitized chat."""
    enc = self.encode_plain if plain else self.encode
    ids = enc("\n" + text)
    n = len(self._newline)
    return ids[n:] if ids[:n] == self._newline else enc(text)

  def piece_to_id(self, piece: str) -> int | None:
    tid = self._tok.token_to_id(piece)
    return None if tid is None else int(tid)


def _config(d: pathlib.Path) -> dict:
  f = d / "tokenizer_config.json"
  return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _token_str(v: object) -> str | None:
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) else None


def load(path: str | os.PathLike, **kwargs) -> Tokenizer:
  """Loads a tokenizer dir (tokenizer.json or tokenizer.model inside), `*.model` as
  SentencePiece, `*.json` as HF tokenizers; clear errors name the file. A directory (or a file
  named tokenizer.json/.model) also supplies eos/pad names and the chat files (`chat_dir`)."""
  p = pathlib.Path(path)
  if p.is_dir():
    found = next((p / n for n in _CANONICAL if (p / n).exists()), None)
    if found is None:
      raise FileNotFoundError(f"tokenizer dir {p} has neither tokenizer.json nor "
                              "tokenizer.model")
    p = found
  if not p.is_file():
    raise FileNotFoundError(f"tokenizer file {p} does not exist; pass a SentencePiece .model, "
                            "a HF tokenizer.json or a directory holding one (or call "
                            "tokenizer.default_tokenizer(cache_dir))")
  chat_dir = p.parent if p.name in _CANONICAL else None
  cfg = _config(chat_dir) if chat_dir is not None else {}
  added = {str(v["content"]): bool(v.get("special", False))
           for v in (cfg.get("added_tokens_decoder") or {}).values() if "content" in v} or None
  if p.suffix == ".json":
    for key in ("eos_token", "pad_token"):
      if key not in kwargs and _token_str(cfg.get(key)) is not None:
        kwargs[key] = _token_str(cfg[key])
    tok: Tokenizer = HFTokenizer(p, added=added, **kwargs)
  elif p.suffix == ".model":
    tok = SentencePieceTokenizer(p, added=added)
  else:
    raise TokenizerError(f"tokenizer file {p} has unknown type {p.suffix!r}; expected .model "
                         "(SentencePiece) or tokenizer.json (HF tokenizers)")
  tok.chat_dir = None if chat_dir is None else str(chat_dir)
  return tok


def write_klong_chat_files(directory: str | os.PathLike, tok: Tokenizer) -> None:
  """Writes the klong chat format beside a klong SentencePiece model: chat_template.jinja,
  tokenizer_config.json (named and added tokens) and generation_config.json (stop ids)."""
  d = pathlib.Path(directory)
  ids = {t: tok.special_id(t) for t in CHAT_SPECIAL_TOKENS}
  end, eos = ids["<|end|>"], tok.eos_id
  cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
         "add_eos_token": False, "legacy": False, "add_prefix_space": False,
         "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20,
         "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False,
                                           "rstrip": False, "normalized": False,
                                           "single_word": False} for t, i in ids.items()}}
  gen = {"eos_token_id": sorted({end, eos}), "pad_token_id": tok.pad_id, "bos_token_id": 2}
  for name, text in (("chat_template.jinja", KLONG_TEMPLATE.read_text(encoding="utf-8")),
                     ("tokenizer_config.json", json.dumps(cfg, indent=1)),
                     ("generation_config.json", json.dumps(gen, indent=1))):
    tmp = d / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, d / name)


def copy_tokenizer_files(source: str | os.PathLike, out: str | os.PathLike) -> str:
  """Copies a tokenizer (a dir, or a file) into `out` so that it loads as a model directory
  here and in transformers: tokenizer.json|.model plus the chat files beside it (template,
  tokenizer_config.json, generation_config.json). A klong model without them gets them written.
  Returns the tokenizer file's name."""
  src = pathlib.Path(source)
  if src.is_dir():
    src = next((src / n for n in _CANONICAL if (src / n).is_file()), src / "tokenizer.json")
  if not src.is_file():
    raise FileNotFoundError(f"tokenizer file {src} does not exist")
  dst = pathlib.Path(out)
  dst.mkdir(parents=True, exist_ok=True)
  name = "tokenizer.json" if src.suffix == ".json" else "tokenizer.model"
  shutil.copyfile(src, dst / name)
  chat_dir = src.parent if src.name in _CANONICAL else None
  copied = [n for n in CHAT_FILES if chat_dir is not None and (chat_dir / n).is_file()]
  for n in copied:
    shutil.copyfile(chat_dir / n, dst / n)
  if not copied and name == "tokenizer.model":
    try:
      tok = load(dst / name)
    except TokenizerError as e:
      logging.warning("%s: no chat files written (%s)", src, e)
      return name
    if all(tok.piece_to_id(t) is not None for t in CHAT_SPECIAL_TOKENS):
      write_klong_chat_files(dst, tok)
  return name


def train_tokenizer_dir(corpus_path: str | os.PathLike, directory: str | os.PathLike,
                        vocab_size: int = 512, max_piece_length: int = 16) -> Tokenizer:
  """A klong tokenizer directory (tokenizer.model + chat files), trained once; returns it loaded.

  The model is published last, so a directory with tokenizer.model is complete.
  """
  d = pathlib.Path(directory)
  model = d / "tokenizer.model"
  if not model.exists():
    d.mkdir(parents=True, exist_ok=True)
    path = train_sentencepiece(corpus_path, d / ".sp", vocab_size, max_piece_length)
    write_klong_chat_files(d, load(path))
    os.replace(path, model)
  return load(d)


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
  """The bundled tiny SentencePiece tokenizer dir, trained once from the bundled corpus, cached.

  The cache key hashes the corpus, the chat template and the vocab size, so editing either
  retrains (or rewrites).
  """
  digest = hashlib.sha256(BUNDLED_CORPUS.read_bytes() + KLONG_TEMPLATE.read_bytes()).hexdigest()
  return train_tokenizer_dir(BUNDLED_CORPUS,
                             pathlib.Path(cache_dir) / f"klong_sp_{vocab_size}_{digest[:12]}",
                             vocab_size)

"""Test helpers for native chat formats: render a family's chat template the way transformers does,
and build a small tokenizer directory shaped like GLM-4.5's or Qwen3's (byte-level BPE with the
family's special and added tokens, tokenizer_config.json with the template, generation_config.json
with the stop ids), after ../shared/chat_templates/make_tokenizer_dirs.py."""

import json
import pathlib

import jinja2
import jinja2.ext
import jinja2.sandbox

TEMPLATES = pathlib.Path(__file__).parent / "parser_templates"

FAMILIES = {
    "glm45": dict(
        special=["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>"],
        added=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
               "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
               "/nothink"],
        eos="<|endoftext|>", pad="<|endoftext|>",
        stops=["<|endoftext|>", "<|user|>", "<|observation|>"]),
    "qwen3": dict(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
               "</tool_response>"],
        eos="<|im_end|>", pad="<|endoftext|>", stops=["<|im_end|>", "<|endoftext|>"]),
}

_CORPUS = [
    "The agent reads the paper, writes code and runs experiments in the sandbox.",
    "def main():\n    print('hello world')\n    return {\"loss\": 0.25, \"steps\": [1, 2, 3]}\n",
    "ls -la /workspace/submission && cat reproduce.sh | grep python3",
    "Let me look at the files. I will run the command and check the output carefully.",
    "Unicode: héllo wörld ✓ 日本語 — naïve café.",
] * 20


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def template(family: str) -> str:
  return (TEMPLATES / f"{family}.jinja").read_text()


def render(family, messages, tools=None, **kw) -> str:
  """`family`'s template rendered as transformers renders chat templates (sandboxed, trimmed
  blocks, tojson without ASCII escapes)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  return env.from_string(template(family)).render(messages=messages, tools=tools, **kw)


def make_tokenizer_dir(path: pathlib.Path, family: str, vocab_size: int = 600) -> pathlib.Path:
  """A tokenizer directory shaped like `family`'s (see the module docstring); returns `path`."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  f = FAMILIES[family]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=f["special"],
                                show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS, trainer)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f["special"]])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f["added"]])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  vocab = tok.get_vocab(with_added_tokens=True)
  decoder = {str(vocab[t]): {"content": t, "special": t in f["special"], "lstrip": False,
                             "rstrip": False, "normalized": False, "single_word": False}
             for t in f["special"] + f["added"]}
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template(family),
       "eos_token": f["eos"], "pad_token": f["pad"], "added_tokens_decoder": decoder,
       "clean_up_tokenization_spaces": False, "model_max_length": 131072}, indent=1))
  (path / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [vocab[t] for t in f["stops"]], "pad_token_id": vocab[f["pad"]]},
      indent=1))
  return path

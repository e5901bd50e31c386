"""Builds small HF tokenizer dirs shaped like GLM-4.5's and Qwen3's (test data, see NOTICE).

Byte-level BPE trained on a corpus file, the family's special/added tokens, its chat template
(glm45.jinja / qwen3.jinja beside this file), tokenizer_config.json and generation_config.json
(GLM stops on <|endoftext|>, <|user|> and <|observation|>; Qwen3 on <|im_end|> and <|endoftext|>).
Usage: python make_tokenizer_dirs.py CORPUS_TXT OUTDIR   (needs `tokenizers`)
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

FAMILIES = {
    "glm45": dict(
        template="glm45.jinja",
        special=["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>"],
        added=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
               "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
               "/nothink"],
        eos="<|endoftext|>", pad="<|endoftext|>",
        stops=["<|endoftext|>", "<|user|>", "<|observation|>"]),
    "qwen3": dict(
        template="qwen3.jinja",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
               "</tool_response>"],
        eos="<|im_end|>", pad="<|endoftext|>", stops=["<|im_end|>", "<|endoftext|>"]),
}


def build(corpus: str, out: str, name: str, vocab_size: int = 1500) -> str:
  """Writes OUT/NAME (tokenizer.json, tokenizer_config.json, generation_config.json)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  f = FAMILIES[name]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=f["special"],
                           show_progress=False,
                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train([corpus], tr)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f["special"]])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f["added"]])
  d = os.path.join(out, name)
  os.makedirs(d, exist_ok=True)
  tok.save(os.path.join(d, "tokenizer.json"))
  vocab = tok.get_vocab(with_added_tokens=True)
  decoder = {str(vocab[t]): {"content": t, "special": t in f["special"], "lstrip": False,
                             "rstrip": False, "normalized": False, "single_word": False}
             for t in f["special"] + f["added"]}
  with open(os.path.join(HERE, f["template"]), encoding="utf-8") as fh:
    tpl = fh.read()
  with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tpl,
               "eos_token": f["eos"], "pad_token": f["pad"], "added_tokens_decoder": decoder,
               "clean_up_tokenization_spaces": False, "model_max_length": 131072}, fh, indent=1)
  with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as fh:
    json.dump({"eos_token_id": [vocab[t] for t in f["stops"]], "pad_token_id": vocab[f["pad"]]},
              fh, indent=1)
  return d


if __name__ == "__main__":
  for family in FAMILIES:
    print(build(sys.argv[1], sys.argv[2], family))

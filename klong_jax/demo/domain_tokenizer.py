"""A domain-adapted SentencePiece tokenizer for the demo: bundled corpus + the agent's fixed text.

The fixed prompt prefix (system prompt, tools JSON block, paper) dominates every trajectory; at
vocab 512 on the generic corpus it is ~2.2k tokens. Training on the generic corpus PLUS the
train-split papers/addenda, the scaffold's system prompt, the tools' JSON schemas and the
teacher's solution scripts (as they appear inside JSON tool calls) makes those strings a few long
pieces each. Held-out tasks are never read. JAX-free; uses `tokenizer.train_sentencepiece`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from klong_jax.data import tokenizer as tok_lib


def domain_texts(task_dirs: list[str], repeat: int = 20) -> list[str]:
  """Domain documents: fixed agent strings (x `repeat`) and each train task's paper + solution."""
  from klong_jax.agent import scaffold  # noqa: PLC0415
  from klong_jax.agent.tools import TOOLS  # noqa: PLC0415
  from klong_jax.factory import sweep_teacher  # noqa: PLC0415
  from klong_jax.factory.teacher import ScriptedTeacher, find_paper  # noqa: PLC0415
  from klong_jax.tasks.loader import load_task  # noqa: PLC0415

  fixed = [scaffold.SYSTEM_PROMPT, scaffold.CONTINUE_MESSAGE, json.dumps(list(TOOLS)),
           scaffold.budget_message(60.0)["content"]]
  out = [t for t in fixed for _ in range(repeat)]
  teacher = ScriptedTeacher(skill=1.0, seed=0)
  for d in task_dirs:
    task = load_task(d, require_rubric=False)
    msgs = scaffold.initial_messages(task.config.get("instructions", "Reproduce the paper."),
                                     task.paper_md, task.addendum_md)
    out.extend(m["content"] for m in msgs[1:])
    sweep = sweep_teacher.find_sweep(msgs)
    if sweep is not None:  # Long-horizon sweep: the released files and the agent's commands.
      _, n = sweep
      sub = "/workspace/submission"
      for _, body in sorted(task.files.items()):
        out.append(body.decode("utf-8", "replace"))
      for k in range(1, n + 1):
        out.append(json.dumps({"name": "bash", "arguments": {
            "cmd": sweep_teacher.run_script(sub, k)}}))
        out.append(f"run {k}: ...\n{k}/{n} runs done")
      for _ in range(max(1, repeat // 4)):
        out.append(json.dumps({"name": "bash", "arguments": {
            "cmd": sweep_teacher.reproduce_script(sub)}}))
      continue
    found = find_paper(msgs)
    if found is not None:
      script = teacher.solution_script(found[0], found[1], "/workspace/submission")
      for _ in range(max(1, repeat // 4)):
        out.append(json.dumps({"name": "bash", "arguments": {"cmd": script}}))
  return out


def domain_tokenizer(cache_dir: str, vocab_size: int, task_dirs: list[str],
                     repeat: int = 20, max_piece_length: int = 16) -> tok_lib.Tokenizer:
  """Trains (once; cached by content hash) and loads the domain tokenizer: a directory with
  tokenizer.model and the klong chat template (tokenizer.train_tokenizer_dir)."""
  texts = domain_texts(sorted(task_dirs), repeat)
  base = tok_lib.BUNDLED_CORPUS.read_text(encoding="utf-8")
  # One document per line for SentencePiece: newlines inside a document become spaces would
  # lose code structure, so keep them and let max_sentence_length bound each line instead.
  corpus = base + "\n" + "\n".join(texts) + "\n"
  digest = hashlib.sha256(corpus.encode("utf-8") + tok_lib.KLONG_TEMPLATE.read_bytes()
                          ).hexdigest()[:12]
  directory = pathlib.Path(cache_dir) / f"klong_domain_{vocab_size}_{max_piece_length}_{digest}"
  if not (directory / "tokenizer.model").exists():
    os.makedirs(cache_dir, exist_ok=True)
    corpus_path = pathlib.Path(cache_dir) / f"corpus_{digest}.txt"
    tmp = corpus_path.with_suffix(".tmp")
    tmp.write_text(corpus, encoding="utf-8")
    os.replace(tmp, corpus_path)
    tok_lib.train_tokenizer_dir(corpus_path, directory, vocab_size, max_piece_length)
  return tok_lib.load(directory)

def from_config(c: Any, tasks_root: str, cache_dir: str) -> tok_lib.Tokenizer:
  """The demo config's tokenizer (`c.tokenizer`): domain-adapted on `tasks_root`'s TRAIN split,
  or the generic bundled one when `c.tokenizer.domain` is false."""
  if not c.tokenizer.domain:
    return tok_lib.default_tokenizer(cache_dir, c.tokenizer.vocab_size)
  from klong_jax.tasks import list_tasks  # noqa: PLC0415
  return domain_tokenizer(cache_dir, c.tokenizer.vocab_size, list_tasks(tasks_root, "train"),
                          c.tokenizer.repeat, c.tokenizer.max_piece_length)

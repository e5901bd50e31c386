"""Bundled synthetic agent trajectories with learnable structure, for SFT tests and the CPU demo.

Each trajectory: system prompt, task, a paper-reading turn (the fixed prefix), then experiment
steps (bash tool calls and their outputs), then a final answer that copies the paper's headline
number. Tool-call syntax, step numbering and the copied number are learnable. No JAX imports.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from typing import Any

import numpy as np

from klong_jax.data import corpus_gen, schema, shards
from klong_jax.data.chat import ChatFormat
from klong_jax.data.render import render_trajectory

SYSTEM = ("You are a research agent. Read the paper first, then reproduce its main result with "
          "the tools. Report the reproduced number at the end.")
TOOLS = [
    {"type": "function", "function": {"name": "bash", "description": "Run a shell command.",
                                      "parameters": {"type": "object", "properties": {
                                          "command": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "read_file", "description": "Read a file.",
                                      "parameters": {"type": "object", "properties": {
                                          "path": {"type": "string"}}}}},
]
PREFIX_MESSAGES = 4  # system, task, paper-reading call, paper text


def _call(name: str, **args: Any) -> dict[str, Any]:
  return {"id": "call_0", "type": "function",
          "function": {"name": name, "arguments": json.dumps(args)}}


def synthetic_messages(r: random.Random, task: int, min_steps: int = 2,
                       max_steps: int = 8) -> list[dict[str, Any]]:
  """One synthetic conversation (OpenAI form) for task number `task`."""
  metric = r.choice(["accuracy", "F1", "BLEU", "reward", "success rate"])
  value = f"{r.uniform(10, 99):.1f}"
  body = corpus_gen._markdown(r)[:600]  # short papers keep the prefix well under max_len
  paper = (f"# Paper {task}\n\n{body}\n"
           f"Our method reaches a {metric} of {value} on the main benchmark.\n")
  msgs = [
      {"role": "system", "content": SYSTEM},
      {"role": "user", "content": f"Task {task}: reproduce the main {metric} of the paper at "
                                  "/home/paper.md."},
      {"role": "assistant", "content": "I will read the paper first.",
       "tool_calls": [_call("read_file", path="/home/paper.md")]},
      {"role": "tool", "tool_call_id": "call_0", "content": paper},
  ]
  steps = r.randint(min_steps, max_steps)
  for i in range(1, steps + 1):
    seed = r.randint(0, 99)
    msgs.append({"role": "assistant", "content": f"Step {i}: run experiment {i} with seed {seed}.",
                 "tool_calls": [_call("bash", command=f"python exp_{i}.py --seed {seed}")]})
    acc = float(value) * (0.5 + 0.5 * i / steps)
    msgs.append({"role": "tool", "tool_call_id": "call_0",
                 "content": f"seed {seed} step {i} {metric} {acc:.1f}\n"})
  msgs.append({"role": "assistant",
               "content": f"Done. The reproduced {metric} is {value}, matching the paper."})
  return msgs


def _as_sampled(msgs: list[dict[str, Any]], fmt: ChatFormat, r: random.Random,
                version: int) -> list[dict[str, Any]]:
  """Adds `klong` sampler ids to assistant turns after the prefix: what the chat format says each
  turn generates (its loss-masked span, stop token included; a turn without one gets eos)."""
  rendered = fmt.render(msgs, TOOLS)
  ends = [*rendered.turn_starts[1:], len(rendered.tokens)]
  out = []
  for i, m in enumerate(msgs):
    if m["role"] == "assistant" and i >= PREFIX_MESSAGES:
      span = slice(rendered.turn_starts[i], ends[i])
      ids = rendered.tokens[span][rendered.loss_mask[span] == 1].tolist()
      if not ids or ids[-1] not in fmt.stop_token_ids:
        ids.append(fmt.tok.eos_id if fmt.tok.eos_id in fmt.stop_token_ids
                   else fmt.stop_token_ids[0])
      m = dict(m, klong={"token_ids": ids,
                         "logprobs": [-r.uniform(0.0, 3.0) for _ in ids],
                         "policy_version": version})
    out.append(m)
  return out


def make_synthetic_trajectories(fmt: ChatFormat, num: int, seed: int = 0, min_steps: int = 2,
                                max_steps: int = 8, sampled: bool = False
                                ) -> list[schema.Trajectory]:
  """`num` validated synthetic trajectories (teacher-style, or with sampler ids if `sampled`)."""
  r = random.Random(seed)
  out = []
  for k in range(num):
    msgs = synthetic_messages(r, k, min_steps, max_steps)
    if sampled:
      msgs = _as_sampled(msgs, fmt, r, version=1)
    fields = render_trajectory(msgs, fmt, tools=TOOLS, prefix_messages=PREFIX_MESSAGES)
    rec = dict(fields, id=f"synth-{seed}-{k}", task_id=f"synth-task-{k % 16}",
               group_id=f"synth-task-{k % 16}", reward=1.0, messages=msgs)
    out.append(schema.validate(rec, fmt.tok.vocab_size))
  return out


def write_synthetic_shards(directory: str | os.PathLike, fmt: ChatFormat, num: int,
                           num_shards: int = 2, seed: int = 0, **kwargs: Any) -> list[str]:
  """Writes `num` synthetic trajectories round-robin into `num_shards` ArrayRecord shards."""
  trajs = make_synthetic_trajectories(fmt, num, seed, **kwargs)
  d = pathlib.Path(directory)
  paths = []
  for s in range(num_shards):
    p = d / f"synthetic-{s:05d}{shards.SUFFIX}"
    shards.write_shard(p, [t.to_bytes() for t in trajs[s::num_shards]])
    paths.append(str(p))
  return paths


def unigram_baseline(trajs: list[schema.Trajectory]) -> float:
  """Cross-entropy (nats/token) of the loss tokens under their own unigram distribution."""
  toks = np.concatenate([t.tokens[t.loss_mask == 1] for t in trajs])
  _, counts = np.unique(toks, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())

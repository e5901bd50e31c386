"""Inference context == training chunks: the scaffold's model inputs are the split chunks' contexts.

A >= 40-action sweep episode of the scripted teacher runs through the real scaffold (local
sandbox) with the shared context policy; every request's prompt, rendered as the server renders
it, must equal the start of the chunk that trains that action, token for token. The teacher's
replies carry deliberately non-canonical token ids (one piece per character), so the test also
proves the history goes back to the server as the sampled ids, not as re-tokenized text.
"""

import json
import os

import numpy as np
import pytest

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold
from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.agent.tools import TOOLS
from klong_jax.data import tokenizer
from klong_jax.data.chat import ChatFormat, assistant_text
from klong_jax.data.context import ContextError
from klong_jax.data.render import render_trajectory
from klong_jax.data.schema import Trajectory
from klong_jax.data.splitting import SplitConfig, split_trajectory
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.rollout import episode
from klong_jax.sandbox.base import make_sandbox
from klong_jax.tasks import load_task
from klong_jax.tasks import long_suite as ls
from klong_jax.tasks.families import FAMILY_BY_FN, fresh_params

# The bundled generic tokenizer makes a ~1.8k-token prefix (the demo's domain one: ~0.5k).
MAX_LEN, OVERLAP, COMPLETION = 3072, 256, 160


@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
  return ChatFormat(tokenizer.default_tokenizer(tmp_path_factory.mktemp("tok")))


def _sweep_task(root, runs):
  """A sweep task dir with `runs` settings (built by the suite's own functions)."""
  fam = FAMILY_BY_FN["arith_series"]
  params = fresh_params(fam, runs, seed=3)
  d = os.path.join(root, "arith-long")
  os.makedirs(os.path.join(d, "files", "submission"))
  tid = "arith-long"
  for name, text in [("paper.md", ls._paper(fam, runs, tid)), ("addendum.md", ls._addendum(fam)),
                     ("rubric.json", json.dumps(ls.build_rubric(fam, params, tid))),
                     ("config.yaml", f"id: {tid}\nsplit: train\n"),
                     ("files/submission/runs.json", json.dumps(params)),
                     ("files/submission/run.py", ls.harness(fam)),
                     ("files/submission/solution.py", ls.method_code(fam))]:
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  return load_task(d)


class CharIds:
  """Wraps a policy: each reply carries token ids of one piece per character (non-canonical)."""

  def __init__(self, policy, fmt):
    self.policy, self.fmt = policy, fmt

  def __call__(self, messages, tools):
    msg = self.policy(messages, tools)
    ids = [t for ch in assistant_text(msg) for t in self.fmt.tok.encode(ch)]
    msg["klong"] = {"token_ids": ids + [self.fmt.end_id], "logprobs": [-0.5] * (len(ids) + 1),
                    "policy_version": 3}
    return msg


def run_served(url, stop, task, cfg, fmt, requests):
  """One episode of the real scaffold (local sandbox) against the policy served at `url`
  (stopped after); `requests` receives each request's messages."""
  prefix = scaffold.initial_messages("Reproduce the paper.", task.paper_md, task.addendum_md)
  try:
    with make_sandbox("local") as sb:
      episode.prepare_sandbox(sb, task)
      return scaffold.run_episode(client_lib.make_client(url), sb, prefix, cfg, tools=TOOLS,
                                  fmt=fmt, on_request=requests.append)
  finally:
    stop()


@pytest.mark.slow
def test_scaffold_inputs_equal_split_chunk_contexts(fmt, tmp_path):
  task = _sweep_task(str(tmp_path), runs=42)
  url, stop = serve_in_thread(CharIds(ScriptedTeacher(skill=1.0), fmt))
  requests = []
  cfg = scaffold.AgentConfig(max_steps=80, time_limit_s=600, reminder_every=5,
                             context_tokens=MAX_LEN, context_overlap=OVERLAP,
                             max_completion_tokens=COMPLETION, tool_timeout_s=60)
  ep = run_served(url, stop, task, cfg, fmt, requests)
  assert ep.status == "completed", ep.messages[-3:]
  actions = [m for m in ep.messages if m["role"] == "assistant"]
  assert len(actions) == len(requests) >= 44  # 42 runs + reproduce + submit
  fields = render_trajectory(ep.messages, fmt, tools=TOOLS, prefix_messages=ep.prefix_messages)
  traj = Trajectory(id="ep", task_id=task.id, messages=ep.messages, **fields)
  chunks = split_trajectory(traj, SplitConfig(MAX_LEN, OVERLAP, COMPLETION, keep_positions=True))
  assert len(chunks) >= 4, len(chunks)
  print(f"{len(actions)} actions, {len(traj)} tokens, {len(chunks)} chunks")
  turn_starts = [traj.turn_starts[i] for i, m in enumerate(ep.messages)
                 if m["role"] == "assistant"]
  windows_seen = set()
  for req, start in zip(requests, turn_starts, strict=True):
    prompt = np.asarray(fmt.render_prompt(req, TOOLS), np.int32)  # what the server computes
    assert len(prompt) + COMPLETION + 1 <= MAX_LEN
    (chunk,) = [c for c in chunks if np.any(c.positions[c.loss_mask == 1] == start + 1)]
    np.testing.assert_array_equal(chunk.tokens[:len(prompt)], prompt)
    windows_seen.add(chunk.chunk_index)
    # Canonical re-tokenization of the history would not match the sampled ids.
    assert "token_ids" in req[-1] or req[-1]["role"] != "assistant"
  assert windows_seen == set(range(len(chunks)))  # every chunk is some action's real context
  # Prefix identical in every stage (no time budget in it) and in every chunk.
  assert scaffold.initial_messages("x", "p") == scaffold.initial_messages("x", "p", "", 99.0)
  p = traj.prefix_end
  assert all(np.array_equal(c.tokens[:p], traj.tokens[:p]) for c in chunks)


def test_policy_that_leaves_no_room_is_refused(fmt, tmp_path):
  task = _sweep_task(str(tmp_path), runs=3)
  cfg = scaffold.AgentConfig(context_tokens=2200, context_overlap=200, max_completion_tokens=160)
  prefix = scaffold.initial_messages("Reproduce the paper.", task.paper_md, task.addendum_md)
  with make_sandbox("local") as sb:
    with pytest.raises(ContextError, match="fixed prefix.*raise max_len"):
      scaffold.run_episode(None, sb, prefix, cfg, tools=TOOLS, fmt=fmt)

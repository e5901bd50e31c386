"""Issue 29's must-show: a >= 40-turn scripted episode in GLM-4.5 (and Qwen3) format through the
real scaffold, where every model input equals its split chunk's context token for token.

The scripted teacher (thinking, `reasoning=True`) is the model behind our real OpenAI server
(inference/server.py on the family's tokenizer dir: ChatFormat over its template, the engine and
stop ids, the family's tool-call parser): for each request the server's prompt ids are recorded
and the teacher's reply is generated as native token ids (GLM: `<think>`, `<tool_call>NAME
<arg_key>/<arg_value>`, ending by emitting `<|observation|>` or `<|user|>`; Qwen3: JSON calls,
`<|im_end|>`), which a scripted sampler feeds through the engine. Every sixth turn is a long note
without a call (the scaffold answers as the user: on GLM that message's role token was emitted by
the note, so no window may open there). The finished trajectory is split with the scaffold's
context policy; each recorded prompt must be the start of the chunk that trains that action, the
sampled ids must follow it, and the loss masks must cover exactly the sampled ids.
"""

import json

import numpy as np
import pytest

from klong_jax.agent import scaffold
from klong_jax.agent.tools import TOOLS
from klong_jax.data import tokenizer as tok_lib
from klong_jax.data.chat import ChatFormat
from klong_jax.data.render import render_trajectory
from klong_jax.data.schema import Trajectory
from klong_jax.data.splitting import SplitConfig, split_trajectory
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.inference.engine import Engine
from klong_jax.inference.server import Running, Server
from tests.agent.test_context_policy import _sweep_task, run_served
from tests.data.chat_templates import build_family_dirs
from tests.inference.test_server_native_tools import ScriptedSampler

OVERLAP, COMPLETION, WINDOW = 256, 480, 2000  # WINDOW: history tokens a chunk holds


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  return build_family_dirs(tmp_path_factory.mktemp("families"))


def _native_text(family, msg):
  """The teacher's message as the family's model would generate it (before the stop token)."""
  think = f"<think>{msg.get('reasoning_content') or ''}</think>"
  calls = []
  for tc in msg.get("tool_calls") or []:
    fn = tc["function"]
    args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    if family == "glm45":
      pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>"
                      f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
                      "</arg_value>\n" for k, v in args.items())
      calls.append(f"\n<tool_call>{fn['name']}\n{pairs}</tool_call>")
    else:
      calls.append("\n<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args},
                                                  ensure_ascii=False) + "\n</tool_call>")
  if family == "glm45":
    return f"\n{think}\n{msg.get('content') or ''}" + "".join(calls)
  return f"{think}\n\n{msg.get('content') or ''}" + "".join(calls)


class TeacherModel:
  """The scripted thinking teacher as a model of `family`: its next turn as native token ids."""

  def __init__(self, family, tok):
    self.family, self.tok = family, tok
    self.teacher = ScriptedTeacher(skill=1.0, reasoning=True)
    self.turns = []  # (prompt ids, sampled ids) per request
    self.last_tool = None

  def sample(self, prompt, messages, tools):
    if len(self.turns) % 6 == 5:  # a long turn without a call: the scaffold answers as the user
      note = " ".join(f"check {k}: the runs so far look consistent." for k in range(12))
      msg = {"role": "assistant", "content": note, "reasoning_content": "Take stock first."}
    else:  # the teacher reads the history without the notes and their answers, and its last
      notes = {i + k for i, m in enumerate(messages) if m.get("role") == "assistant"  # output
               and str(m.get("content")).startswith("check 0:") for k in (0, 1)}  # (a note can
      seen = [m for i, m in enumerate(messages) if i not in notes]  # push it out of the window)
      tools_seen = [m for m in seen if m["role"] == "tool"]
      self.last_tool = tools_seen[-1] if tools_seen else self.last_tool
      msg = self.teacher(seen + ([self.last_tool] if self.last_tool and not tools_seen else []),
                         tools)
    if self.family == "glm45":
      stop = self.tok.piece_to_id("<|observation|>" if msg.get("tool_calls") else "<|user|>")
    else:
      stop = self.tok.piece_to_id("<|im_end|>")
    ids = self.tok.encode(_native_text(self.family, msg)) + [stop]
    assert len(ids) <= COMPLETION  # within max_tokens, as a real model's turn would be
    self.turns.append((prompt, ids))
    return ids


class TeacherServer(Server):
  """Our OpenAI server (the real ChatFormat over the dir's template, engine, stop ids, family
  parser); the model is TeacherModel, replayed through the engine by a ScriptedSampler."""

  def __init__(self, family, path, max_len):
    tok = tok_lib.load(path)
    fmt = ChatFormat(tok)  # the server's own instance
    self.model = TeacherModel(family, tok)
    self.sampler = ScriptedSampler(stop=fmt.stop_token_ids[0], max_len=max_len)
    super().__init__(Engine(self.sampler, tok, stop_token_ids=fmt.stop_token_ids), tok, fmt,
                     model_name="policy", tool_parser=family)

  def chat_prompt(self, req):
    prompt = super().chat_prompt(req)  # the model input, as served
    ids = self.model.sample(prompt, req.messages, req.tools)
    self.sampler.scripts, self.sampler.stop = [ids[:-1]], ids[-1]
    return prompt


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm45", "qwen3"])
def test_native_scaffold_inputs_equal_split_chunk_contexts(family, family_dirs, tmp_path):
  task = _sweep_task(str(tmp_path), runs=40)
  fmt = ChatFormat(tok_lib.load(family_dirs[family]))  # the scaffold's (and trainer's) format
  prefix = scaffold.initial_messages("Reproduce the paper.", task.paper_md, task.addendum_md)
  max_len = len(fmt.render(prefix, TOOLS).tokens) + WINDOW
  server = TeacherServer(family, family_dirs[family], max_len + 64)
  running = Running(server)
  endpoint = server.model
  requests = []
  cfg = scaffold.AgentConfig(max_steps=80, time_limit_s=600, reminder_every=5,
                             context_tokens=max_len, context_overlap=OVERLAP,
                             max_completion_tokens=COMPLETION, tool_timeout_s=60)
  ep = run_served(running.url + "/v1", running.stop, task, cfg, fmt, requests)
  assert ep.status == "completed", ep.messages[-3:]
  assert ep.malformed_calls == 0
  actions = [i for i, m in enumerate(ep.messages) if m["role"] == "assistant"]
  assert len(actions) == len(requests) == len(endpoint.turns) >= 42  # 40 runs, notes, submit
  assert all(ep.messages[i].get("reasoning_content") for i in actions)  # kept in history
  fields = render_trajectory(ep.messages, fmt, tools=TOOLS, prefix_messages=ep.prefix_messages)
  traj = Trajectory(id="ep", task_id=task.id, messages=ep.messages, **fields)
  if family == "glm45":  # every message after an action starts after the role token it emitted
    assert traj.joined == [i + 1 for i in actions if i + 1 < len(ep.messages)]
  chunks = split_trajectory(traj, SplitConfig(max_len, OVERLAP, COMPLETION, keep_positions=True))
  assert len(chunks) >= 3, len(chunks)
  trained = np.zeros(len(traj), bool)
  starts = {c.positions[traj.prefix_end] for c in chunks[1:]}  # where each window opens
  barred = {traj.turn_starts[j] for j in traj.joined}
  assert not starts & barred  # no window opens on a role token the previous turn emitted
  windows_seen = set()
  for i, (prompt, ids) in zip(actions, endpoint.turns, strict=True):
    start = traj.turn_starts[i]  # the action's first token (its role token / header)
    sampled = np.flatnonzero(traj.loss_mask[start:])[0] + start
    (chunk,) = [c for c in chunks if np.any(c.positions[c.loss_mask == 1] == sampled)]
    assert len(prompt) + COMPLETION <= max_len
    assert chunk.tokens[:len(prompt)].tolist() == prompt  # the model input, token for token
    assert chunk.tokens[len(prompt):len(prompt) + len(ids)].tolist() == ids
    assert chunk.loss_mask[len(prompt):len(prompt) + len(ids)].all()
    trained[chunk.positions[len(prompt):len(prompt) + len(ids)]] = True
    windows_seen.add(chunk.chunk_index)
  assert windows_seen == set(range(len(chunks)))
  in_chunks = np.zeros(len(traj), bool)
  for c in chunks:
    assert not in_chunks[c.positions[c.loss_mask == 1]].any()  # each loss token trained once
    in_chunks[c.positions[c.loss_mask == 1]] = True
  np.testing.assert_array_equal(in_chunks, trained)  # the masks cover exactly the sampled ids
  np.testing.assert_array_equal(traj.loss_mask.astype(bool), trained)
  assert int(trained.sum()) == sum(len(ids) for _, ids in endpoint.turns)

"""The OpenAI server on a GLM-4.5-shaped tokenizer directory, answering the official `openai` client
with parsed `tool_calls` and `reasoning_content`, streaming included, and with `tool_call_error`
for malformed calls. The model is scripted (ScriptedSampler emits fixed token ids through the
real engine, detokenizer and stop ids); prompts are rendered by the real ChatFormat over the dir's
template (with the request's chat_template_kwargs); the parser is the one the template names."""

import dataclasses
import json
import pathlib

import numpy as np
import openai
import pytest

from klong_jax.data import chat_template as ct
from klong_jax.data import tokenizer as tokenizer_lib
from klong_jax.data import tool_parsers
from klong_jax.data.chat import ChatFormat
from klong_jax.inference.engine import Engine
from klong_jax.inference.server import Running, Server
from tests.data.chat_templates import build_family_dirs


def _tool(name, **props):
  return {"type": "function", "function": {"name": name, "parameters": {
      "type": "object", "properties": {k: {"type": t} for k, t in props.items()}}}}


TOOLS = [_tool("bash", cmd="string", timeout="integer"),
         _tool("write", path="string", opts="object", force="boolean")]
MSGS = [{"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "List the files, then write notes.md."}]
GOOD = ("\n<think>The user wants a listing first.\nThen the notes — in ünïcode ✓.</think>\n"
        "Let me look.\n<tool_call>bash\n<arg_key>cmd</arg_key>\n"
        "<arg_value>ls -la | head</arg_value>\n<arg_key>timeout</arg_key>\n<arg_value>30"
        "</arg_value>\n</tool_call>\n<tool_call>write\n"
        "<arg_key>path</arg_key>\n<arg_value>notes ✓.md</arg_value>\n<arg_key>opts</arg_key>\n"
        '<arg_value>{"mode": "a", "lines": [1, 2]}</arg_value>\n<arg_key>force</arg_key>\n'
        "<arg_value>true</arg_value>\n</tool_call>")
GOOD_CALLS = [("bash", {"cmd": "ls -la | head", "timeout": 30}),
              ("write", {"path": "notes ✓.md", "opts": {"mode": "a", "lines": [1, 2]},
                         "force": True})]
BAD = ("\n<think>Run it.</think>\nRunning.\n<tool_call>bash\n<arg_key>cmd</arg_key>\n"
       "</tool_call>")


class ScriptedSampler:
  """A Sampler stand-in: each admitted request generates the next of `scripts` (token ids; the
  last one repeats), then `stop`."""

  def __init__(self, stop: int, max_batch: int = 4, max_len: int = 4096):
    self.max_batch, self.max_len, self.stop = max_batch, max_len, stop
    self.min_prefill_bucket, self.min_prefill_rows = 16, 1
    self.policy_version, self.vocab_size = 0, 1 << 16
    self.top_logprobs = self.routing = self.model_cfg = None
    self.scripts: list[list[int]] = [[]]
    self._rows: dict[int, list[int]] = {}

  def _next(self, row: int, i: int) -> int:
    script = self._rows.get(row, [])
    return script[i] if i < len(script) else self.stop

  def prefill(self, rows, prompts, settings, starts=None):
    for row in rows:
      self._rows[row] = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
    return (np.asarray([self._next(row, 0) for row in rows]),
            np.zeros((3, len(rows)), np.float32))

  def decode(self, tokens, positions, settings, counters):
    return (np.asarray([self._next(row, int(c)) for row, c in enumerate(counters)]),
            np.full((3, len(counters)), -0.5, np.float32))


GEN_PROMPT = ("<|assistant|>{{- '\\n<think></think>' if (enable_thinking is defined and not "
              "enable_thinking) else '' -}}")


def think_opening_format(tok, d):
  """The dir's ChatFormat with a template whose generation prompt opens `<think>` (as thinking
  models' templates such as DeepSeek-R1's do): the model continues inside the block."""
  spec = ct.load_spec(d)
  assert GEN_PROMPT in spec.template
  opened = GEN_PROMPT.replace("else ''", "else '\\n<think>'")
  return ChatFormat(tok, dataclasses.replace(spec, template=spec.template.replace(GEN_PROMPT,
                                                                                  opened)))


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
  d = build_family_dirs(tmp_path_factory.mktemp("families"))["glm45"]
  tok = tokenizer_lib.load(d)
  stops = json.loads((pathlib.Path(d) / "generation_config.json").read_text())["eos_token_id"]
  sampler = ScriptedSampler(stop=tok.piece_to_id("<|observation|>"))
  engine = Engine(sampler, tok, stop_token_ids=stops)
  fmt = ChatFormat(tok)
  family = tool_parsers.family_for(d)
  server = Server(engine, tok, fmt, model_name="glm-tiny", tool_parser=family)
  running = Running(server)
  client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
  yield dict(tok=tok, sampler=sampler, fmt=fmt, client=client, family=family, dir=d,
             url=running.url, server=server)
  running.stop()


def _script(glm, *texts):
  glm["sampler"].scripts = [glm["tok"].encode(t) for t in texts]
  return glm["sampler"].scripts[0] + [glm["sampler"].stop]


def _calls(tool_calls):
  return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls]


def _streamed(glm, **kw):
  """(reasoning, content, tool calls, tool_call_error, finish_reason, deltas) of a stream."""
  reasoning = content = ""
  calls: dict[int, dict] = {}
  error = reason = None
  deltas = []
  for chunk in glm["client"].chat.completions.create(model="glm-tiny", stream=True, **kw):
    for c in chunk.choices:
      d = c.delta
      deltas.append(d)
      extra = d.model_extra or {}
      reasoning += extra.get("reasoning_content") or ""
      content += d.content or ""
      error = extra.get("tool_call_error", error)
      for tc in d.tool_calls or []:
        slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
        slot["name"] += tc.function.name or ""
        slot["arguments"] += tc.function.arguments or ""
      reason = c.finish_reason or reason
  got = [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())]
  return reasoning, content, got, error, reason, deltas


def test_glm_dir_selects_the_glm_parser(glm):
  assert glm["family"] == "glm45"


def test_tool_calls_and_reasoning(glm):
  ids = _script(glm, GOOD)
  resp = glm["client"].chat.completions.create(model="glm-tiny", messages=MSGS, tools=TOOLS,
                                               logprobs=True)
  choice = resp.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.model_extra["token_ids"] == ids
  msg = choice.message
  assert msg.content == "Let me look."
  assert msg.model_extra["reasoning_content"] == ("The user wants a listing first.\nThen the "
                                                  "notes — in ünïcode ✓.")
  assert _calls(msg.tool_calls) == GOOD_CALLS and "tool_call_error" not in msg.model_extra
  assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls)
  assert resp.usage.prompt_tokens == len(glm["fmt"].render_prompt(MSGS, TOOLS))


def test_chat_template_kwargs_reach_the_template(glm):
  """vLLM's `chat_template_kwargs` (extra body): enable_thinking=false renders GLM's empty think
  block after the generation prompt; the answer then has no reasoning."""
  _script(glm, "Nothing to think about.")
  off = glm["fmt"].render_prompt(MSGS, TOOLS, enable_thinking=False)
  assert off != glm["fmt"].render_prompt(MSGS, TOOLS)
  assert glm["tok"].decode(off).endswith("<|assistant|>\n<think></think>")
  resp = glm["client"].chat.completions.create(
      model="glm-tiny", messages=MSGS, tools=TOOLS,
      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
  assert resp.usage.prompt_tokens == len(off)
  msg = resp.choices[0].message
  assert msg.content == "Nothing to think about." and "reasoning_content" not in msg.model_extra
  with pytest.raises(openai.BadRequestError, match="chat_template_kwargs may not set"):
    glm["client"].chat.completions.create(model="glm-tiny", messages=MSGS,
                                          extra_body={"chat_template_kwargs": {"tools": []}})


def test_streaming_matches_and_sends_no_partial_tags(glm):
  _script(glm, GOOD)
  reasoning, content, calls, error, reason, deltas = _streamed(glm, messages=MSGS, tools=TOOLS)
  assert reasoning.startswith("The user wants a listing first.") and content == "Let me look."
  assert calls == GOOD_CALLS and error is None and reason == "tool_calls"
  texts = [(d.model_extra or {}).get("reasoning_content") or d.content or "" for d in deltas]
  assert not any("<" in t for t in texts)
  assert sum(bool((d.model_extra or {}).get("reasoning_content")) for d in deltas) > 5


def test_malformed_call_is_content_with_an_error(glm):
  _script(glm, BAD)
  msg = glm["client"].chat.completions.create(model="glm-tiny", messages=MSGS,
                                              tools=TOOLS).choices[0]
  assert msg.finish_reason == "stop" and not msg.message.tool_calls
  assert msg.message.content == BAD.split("</think>")[1].strip()
  err = msg.message.model_extra["tool_call_error"]
  assert "has no <arg_value>" in err and "<arg_key>KEY</arg_key>" in err
  reasoning, content, calls, s_err, reason, _ = _streamed(glm, messages=MSGS, tools=TOOLS)
  assert (reasoning, content, calls, s_err, reason) == ("Run it.", msg.message.content, [], err,
                                                        "stop")


def test_prompt_that_opens_think(glm):
  glm["server"].chat = think_opening_format(glm["tok"], glm["dir"])
  try:
    _script(glm, "still planning</think>\nDone, nothing to run.")
    msg = glm["client"].chat.completions.create(model="glm-tiny", messages=MSGS).choices[0]
    assert msg.message.model_extra["reasoning_content"] == "still planning"
    assert msg.message.content == "Done, nothing to run." and msg.finish_reason == "stop"
    reasoning, content, *_ = _streamed(glm, messages=MSGS)
    assert (reasoning, content) == ("still planning", "Done, nothing to run.")
  finally:
    glm["server"].chat = glm["fmt"]


def test_scaffold_answers_a_malformed_glm_call_with_an_error_observation(glm):
  from klong_jax.agent import client as client_lib
  from klong_jax.agent import scaffold
  from klong_jax.sandbox.base import make_sandbox
  turns = ["\n<think>List it.</think>\n<tool_call>bash\n<arg_key>cmd</arg_key>\n</tool_call>",
           "\n<think>Now in the right form.</think>\n<tool_call>bash\n<arg_key>cmd</arg_key>\n"
           "<arg_value>echo glm ✓</arg_value>\n</tool_call>",
           "\n<think>Done.</think>\nSubmitting.\n<tool_call>submit\n<arg_key>end_message</arg_key>"
           "\n<arg_value>bye</arg_value>\n</tool_call>"]
  first_ids = _script(glm, *turns)
  prefix = scaffold.initial_messages("Do the task.", "PAPER TEXT", "", 60)
  with make_sandbox("local") as sb:
    cfg = scaffold.AgentConfig(model="glm-tiny", reminder_every=0, max_completion_tokens=256,
                               retry_backoff_s=0.01)
    ep = scaffold.run_episode(client_lib.make_client(glm["url"] + "/v1"), sb, prefix, cfg)
  bad, obs, fixed, out, done = ep.messages[4:9]
  assert bad["content"] == turns[0].split("</think>\n")[1] and "tool_calls" not in bad
  assert bad["reasoning_content"] == "List it." and bad["klong"]["token_ids"] == first_ids
  assert "has no <arg_value>" in bad["meta"]["tool_call_error"]
  assert obs["role"] == "user" and "could not be parsed" in obs["content"]
  assert "has no <arg_value>" in obs["content"] and "<arg_key>KEY</arg_key>" in obs["content"]
  assert fixed["reasoning_content"] == "Now in the right form."
  assert json.loads(fixed["tool_calls"][0]["function"]["arguments"]) == {"cmd": "echo glm ✓"}
  assert out["role"] == "tool" and out["content"] == "glm ✓"
  assert done["content"] == "Submitting." and ep.messages[-1]["content"] == "Submitted. bye"
  assert ep.status == "completed" and ep.malformed_calls == 1


TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
        "<arg_value>", "</arg_value>")


@pytest.mark.slow
def test_real_tiny_model_on_the_glm_tokenizer_never_breaks_the_parser(glm):
  """Sampled token soup (tags included) from a tiny model over the GLM-shaped vocabulary: every
  answer, plain or streamed, is the family parse of the sampled text; nothing crashes."""
  import dataclasses

  from flax import nnx

  from klong_jax.inference.sampler import Sampler
  from klong_jax.model.config import get_preset
  from klong_jax.model.transformer import Transformer
  tok = glm["tok"]
  cfg = dataclasses.replace(get_preset("tiny"), vocab_size=-(-tok.vocab_size // 64) * 64)
  stops = {tok.piece_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
  engine = Engine(Sampler(Transformer(cfg.validate(), rngs=nnx.Rngs(0)), max_batch=4,
                          max_len=256, min_prefill_bucket=64, min_prefill_rows=4), tok,
                  stop_token_ids=sorted(stops))
  server = Server(engine, tok, glm["fmt"], model_name="glm-tiny", tool_parser="glm45")
  running = Running(server)
  parser = tool_parsers.get_parser("glm45")
  try:
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
    kw = dict(model="glm-tiny", messages=MSGS, max_tokens=120, temperature=1.5)
    seen_tags = 0
    for seed in range(3):
      resp = client.chat.completions.create(n=4, seed=seed, **kw)
      for c in resp.choices:
        ids = c.model_extra["token_ids"]
        text = tok.decode([t for t in ids if t not in stops])
        want = parser.parse(text)
        seen_tags += any(t in text for t in TAGS)
        assert c.message.content == (want.content or None if want.tool_calls else want.content)
        assert (c.message.model_extra or {}).get("reasoning_content") == want.reasoning_content
        assert _calls(c.message.tool_calls or []) == [
            (t["function"]["name"], json.loads(t["function"]["arguments"]))
            for t in want.tool_calls]
        assert (c.message.model_extra or {}).get("tool_call_error") == want.error
      ids, reasoning, content = [], "", ""
      for chunk in client.chat.completions.create(stream=True, seed=seed, **kw):
        for ch in chunk.choices:
          ids += ch.model_extra.get("token_ids") or []
          reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
          content += ch.delta.content or ""
      want = parser.parse(tok.decode([t for t in ids if t not in stops]))
      assert (reasoning, content) == (want.reasoning_content or "", want.content)
    assert seen_tags >= 3  # The soup did contain the parser's tags.
  finally:
    running.stop()


def test_klong_server_keeps_the_registry_aliases(tmp_path):
  """The klong format through the real server and scaffold: calls named by the tool registry's
  aliases (`python-tool`, `web_search`, `end_task`; not in the offered schemas) still reach the
  registry and run, as before native parsing; an unknown name is answered by the registry."""
  from klong_jax.agent import client as client_lib
  from klong_jax.agent import scaffold
  from klong_jax.sandbox.base import make_sandbox
  tok = tokenizer_lib.load(tokenizer_lib.default_tokenizer(tmp_path / "tok").path)
  fmt = ChatFormat(tok)
  sampler = ScriptedSampler(stop=fmt.end_id)
  server = Server(Engine(sampler, tok, stop_token_ids=fmt.stop_token_ids), tok, fmt,
                  model_name="klong-tiny", tool_parser="klong")
  call = '<|tool_call|>{{"name": "{}", "arguments": {}}}<|/tool_call|>'.format
  turns = [call("python-tool", json.dumps({"code": "print(6 * 7)"})),
           call("web_search", json.dumps({"query": "x"})), call("shout", "{}"),
           "Done. " + call("end_task", json.dumps({"end_message": "bye"}))]
  sampler.scripts = [tok.encode(t) for t in turns]
  running = Running(server)
  try:
    with make_sandbox("local") as sb:
      cfg = scaffold.AgentConfig(model="klong-tiny", reminder_every=0, max_completion_tokens=128,
                                 context_tokens=2048,
                                 retry_backoff_s=0.01)
      ep = scaffold.run_episode(client_lib.make_client(running.url + "/v1"), sb,
                                scaffold.initial_messages("Do it.", "PAPER"), cfg, fmt=fmt)
  finally:
    running.stop()
  out = [m for m in ep.messages if m["role"] == "tool"]
  assert [m["name"] for m in out] == ["python-tool", "web_search", "shout", "end_task"]
  assert out[0]["content"].strip() == "42" and "offline" in out[1]["content"].lower()
  assert "unknown tool 'shout'" in out[2]["content"]
  assert ep.end_reason == "submitted" and ep.malformed_calls == 2  # offline search, shout
  assert not any(m.get("meta", {}).get("tool_call_error") for m in ep.messages)

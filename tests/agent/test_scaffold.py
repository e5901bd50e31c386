"""Scaffold against the policy server with scripted policies (local sandbox)."""

import json

import pytest

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold
from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.data import tool_parsers
from klong_jax.sandbox.base import make_sandbox


def _call(name, args, raw=None):
  return {"id": f"c_{name}", "type": "function",
          "function": {"name": name, "arguments": raw if raw is not None else json.dumps(args)}}


class Script:
  """Replays a fixed list of assistant messages (then keeps submitting)."""

  def __init__(self, turns):
    self.turns, self.seen = list(turns), []

  def __call__(self, messages, tools):
    self.seen.append(messages)
    if self.turns:
      return self.turns.pop(0)
    return {"role": "assistant", "content": "done", "tool_calls": [_call("submit", {
        "end_message": "bye"})]}


@pytest.fixture
def run():
  stops = []

  def go(policy, parser=None, **cfg):
    url, stop = serve_in_thread(policy)
    stops.append(stop)
    client = client_lib.make_client(url)
    prefix = scaffold.initial_messages("Do the task.", "PAPER TEXT", "ADDENDUM", 60)
    with make_sandbox("local") as sb:
      sb.exec("mkdir -p /workspace/submission", 10)
      return scaffold.run_episode(client, sb, prefix, scaffold.AgentConfig(
          retry_backoff_s=0.01, **cfg), parser=parser)
  yield go
  for s in stops:
    s()


def test_tools_malformed_calls_and_klong_fields(run):
  sampled = {"token_ids": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "policy_version": 4}
  pol = Script([
      {"role": "assistant", "content": "", "klong": sampled,
       "tool_calls": [_call("bash", {"cmd": "echo hello > f.txt; cat f.txt"})]},
      {"role": "assistant", "content": "", "tool_calls": [_call("bash", None, raw="{not json")]},
      {"role": "assistant", "content": "", "tool_calls": [_call("nope", {})]},
      {"role": "assistant", "content": "", "tool_calls": [_call("read_file_chunk", {
          "file": "f.txt", "max_lines": "x"})]},
      {"role": "assistant", "content": "", "tool_calls": [_call("python", {
          "code": "print(6 * 7)"})]},
      {"role": "assistant", "content": "thinking, no tool"},
      {"role": "assistant", "content": "", "tool_calls": [_call("search_file", {
          "file": "f.txt", "query": "HELLO"})]},
  ])
  ep = run(pol, reminder_every=0)
  tools = [m["content"] for m in ep.messages if m["role"] == "tool"]
  assert tools[0] == "hello"
  assert "not valid JSON" in tools[1] and "unknown tool 'nope'" in tools[2]
  assert "must be an integer" in tools[3] and tools[4] == "42"
  assert ">>> 1: hello" in tools[5] and "[Match 1 of 1]" in tools[5]
  assert ep.status == "completed" and ep.malformed_calls == 3 and ep.prefix_messages == 3
  assert ep.messages[4]["klong"] == sampled  # [3] is the time-budget message
  assert any(m["content"] == scaffold.CONTINUE_MESSAGE for m in ep.messages if m["role"] == "user")
  assert all("klong" not in m and "meta" not in m for m in pol.seen[-1])  # Not sent back.


def test_step_budget_reminders_and_no_early_end(run):
  loop = {"role": "assistant", "content": "", "tool_calls": [_call("bash", {"cmd": "true"})]}
  early = {"role": "assistant", "content": "", "tool_calls": [_call("submit", {"end_message": ""})]}
  ep = run(Script([early] + [loop] * 20), max_steps=6, reminder_every=2,
           min_submit_fraction=0.5, max_submit_refusals=1, time_limit_s=3600)
  assert ep.status == "step_limit" and ep.end_reason == "max_steps" and ep.steps == 6
  assert "Submission refused" in ep.messages[5]["content"]
  reminders = [m for m in ep.messages if m["role"] == "user" and "time elapsed" in m["content"]]
  assert len(reminders) == 3


def test_context_trimming_keeps_prefix_and_pairs(run):
  big = "x" * 4000
  pol = Script([{"role": "assistant", "content": "", "tool_calls": [_call(
      "bash", {"cmd": f"echo {big}"})]}] * 8)
  ep = run(pol, max_steps=8, context_tokens=2000, max_completion_tokens=100,
           chars_per_token=4.0, reminder_every=0)
  assert ep.trims > 0 and len(ep.messages) == 3 + 1 + 8 * 2  # The full log is kept.
  last = pol.seen[-1]
  assert [m["content"] for m in last[:3]] == [m["content"] for m in ep.messages[:3]]
  assert last[3]["role"] == "assistant"  # No orphan tool result after the prefix.
  assert len(last) < len(ep.messages)


def test_trim_context_units():
  pre = [{"role": "system", "content": "s"}]
  hist = [{"role": "assistant", "content": "a" * 400, "tool_calls": []},
          {"role": "tool", "content": "t" * 400}, {"role": "user", "content": "u"}]
  out, dropped = scaffold.trim_context(pre + hist, 1, budget=60, chars_per_token=4.0)
  assert dropped == 1 and out == pre + hist[2:]


def test_wall_stop_and_server_failure(run):
  ep_state = {"n": 0}

  def stop():
    ep_state["n"] += 1
    return ep_state["n"] > 2
  loop = {"role": "assistant", "content": "", "tool_calls": [_call("bash", {"cmd": "true"})]}
  url, stop_server = serve_in_thread(Script([loop] * 10))
  client = client_lib.make_client(url)
  with make_sandbox("local") as sb:
    ep = scaffold.run_episode(client, sb, [{"role": "user", "content": "go"}],
                              scaffold.AgentConfig(reminder_every=0), should_stop=stop)
    assert ep.status == "wall_timeout" and ep.steps == 2

    def broken(messages, tools):
      raise RuntimeError("boom")
    url2, stop2 = serve_in_thread(broken)
    with pytest.raises(client_lib.InfraError, match="after 2 attempts"):
      scaffold.run_episode(client_lib.make_client(url2), sb, [{"role": "user", "content": "go"}],
                           scaffold.AgentConfig(request_retries=1, retry_backoff_s=0.01))
    stop2()
  stop_server()


def test_unparsable_tool_call_becomes_error_observation_and_reasoning_is_kept(run):
  err = ("tool call 0 ('bash'): <arg_key>cmd</arg_key> has no <arg_value> after it; expected "
         "each tool call as <tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>"
         "\n</tool_call>")
  raw = "Running.\n<tool_call>bash\n<arg_key>cmd</arg_key>\n</tool_call>"
  pol = Script([
      {"role": "assistant", "content": raw, "reasoning_content": "List first.",
       "tool_call_error": err},
      {"role": "assistant", "content": "<think>Fixed form.</think>\nAgain.",
       "tool_calls": [_call("bash", {"cmd": "echo fixed"})]},
  ])
  ep = run(pol, reminder_every=0)
  bad, obs = ep.messages[4], ep.messages[5]
  assert bad["content"] == raw and bad["reasoning_content"] == "List first."
  assert "tool_call_error" not in bad and bad["meta"]["tool_call_error"] == err
  assert obs["role"] == "user" and "could not be parsed" in obs["content"]
  assert "has no <arg_value>" in obs["content"] and "<arg_key>KEY</arg_key>" in obs["content"]
  # An endpoint that leaves <think> in the content: split into reasoning_content.
  good = ep.messages[6]
  assert (good["reasoning_content"], good["content"]) == ("Fixed form.", "Again.")
  assert ep.messages[7]["content"] == "fixed" and ep.malformed_calls == 1
  # Reasoning goes back to the server in history (the template decides whether to render it);
  # the parse error is bookkeeping and does not.
  sent = pol.seen[-1]
  assert sent[4]["reasoning_content"] == "List first." and "tool_call_error" not in sent[4]
  assert sent[5]["content"] == obs["content"]


def test_scaffold_parses_tool_call_text_an_endpoint_left_unparsed(run):
  pol = Script([
      {"role": "assistant", "content": '<think>\nplan\n</think>\n\nGo.\n<tool_call>\n{"name": '
       '"bash", "arguments": {"cmd": "echo q"}}\n</tool_call>'},
      {"role": "assistant", "content": '<tool_call>\n{"name": "bash", "arguments": {"cmd": oops}}'
       "\n</tool_call>"},
  ])
  ep = run(pol, parser=tool_parsers.get_parser("qwen3"), reminder_every=0)
  first = ep.messages[4]
  assert (first["reasoning_content"], first["content"]) == ("plan", "Go.")
  assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"cmd": "echo q"}
  assert ep.messages[5]["content"] == "q"
  obs = ep.messages[7]["content"]
  assert "not valid JSON" in obs and '{"name": NAME, "arguments"' in obs
  assert ep.malformed_calls == 1 and ep.status == "completed"

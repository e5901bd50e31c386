"""The tool registry: a new tool is one `Tool(name, schema, run)` entry, offered and dispatched."""

import json

import pytest

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold, tools
from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.sandbox.base import make_sandbox


def _shout(sandbox, args, timeout_s, workdir):
  del timeout_s, workdir
  res = sandbox.exec(f"echo {tools._str_arg(args, 'text').upper()}", 10)
  return tools.ToolOutcome(res.output.strip())


SHOUT = tools.Tool("shout", tools.function_schema(
    "shout", "Echo text in capitals.", {"text": {"type": "string"}}, ["text"]), _shout,
    aliases=("yell",))


@pytest.fixture
def shout():
  tools.REGISTRY.register(SHOUT)
  yield SHOUT
  tools.REGISTRY.unregister("shout")


def test_registered_tool_is_offered_and_dispatched(shout):
  assert tools.TOOLS[-1] is shout.schema and "shout" in tools.REGISTRY.names()
  with make_sandbox("local") as sb:
    assert tools.execute_tool(sb, "shout", {"text": "hi"}, 10).content == "HI"
    assert tools.execute_tool(sb, "yell", '{"text": "yo"}', 10).content == "YO"
    bad = tools.execute_tool(sb, "shout", {}, 10)
    assert bad.error and "missing required argument 'text'" in bad.content


def test_registry_unregister_and_name_clash(shout):
  with pytest.raises(ValueError, match="already registered: shout, yell"):
    tools.REGISTRY.register(shout)
  with pytest.raises(ValueError, match="schema named 'bash'"):
    tools.Tool("other", tools.TOOLS[0], _shout)
  reg = tools.ToolRegistry([shout])
  reg.unregister("shout")
  assert reg.schemas == [] and reg.get("yell") is None
  with make_sandbox("local") as sb:
    out = reg.execute(sb, "shout", {"text": "x"}, 10)
  assert out.error and "unknown tool 'shout'; available tools: " in out.content


def test_default_schemas_and_hidden_tools():
  assert tools.REGISTRY.names() == ("bash", "python", "read_file_chunk", "search_file", "submit")
  with make_sandbox("local") as sb:
    out = tools.execute_tool(sb, "browse", {}, 10)
    assert out.error and "offline" in out.content
    assert tools.execute_tool(sb, "end_task", {"end_message": "ok"}, 10).submitted
    assert "available tools: bash, python, read_file_chunk, search_file, submit" in (
        tools.execute_tool(sb, "nope", {}, 10).content)


def test_scaffold_offers_and_runs_registered_tool(shout):
  seen_tools = []

  def policy(messages, offered):
    seen_tools.append([t["function"]["name"] for t in offered])
    if len(seen_tools) == 1:
      return {"role": "assistant", "content": "", "tool_calls": [{
          "id": "c1", "type": "function",
          "function": {"name": "shout", "arguments": json.dumps({"text": "loud"})}}]}
    return {"role": "assistant", "content": "", "tool_calls": [{
        "id": "c2", "type": "function",
        "function": {"name": "submit", "arguments": json.dumps({"end_message": "bye"})}}]}

  url, stop = serve_in_thread(policy)
  try:
    prefix = scaffold.initial_messages("Do the task.", "PAPER", "ADDENDUM", 60)
    with make_sandbox("local") as sb:
      ep = scaffold.run_episode(client_lib.make_client(url), sb, prefix, scaffold.AgentConfig(
          retry_backoff_s=0.01, no_early_end=False, reminder_every=0))
  finally:
    stop()
  assert "shout" in seen_tools[0]
  outs = [m["content"] for m in ep.messages if m["role"] == "tool"]
  assert outs[0] == "LOUD" and ep.status == "completed"

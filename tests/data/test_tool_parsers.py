"""Tool-call and reasoning parsers per family: each reads back what its chat template renders
(templates in chat_templates/, rendered as transformers renders them), typed GLM values, malformed
calls as errors, family detection, and streaming deltas adding up to the whole-turn parse for
every split point."""

import json
import random

import pytest

from klong_jax.data import tool_parsers as tp
from tests.data.chat_templates import TEMPLATES, render

TOOLS = [
    {"type": "function", "function": {
        "name": "bash", "description": "Run a command.",
        "parameters": {"type": "object", "properties": {
            "cmd": {"type": "string"}, "timeout": {"type": "integer"}}, "required": ["cmd"]}}},
    {"type": "function", "function": {
        "name": "write", "description": "Write a file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "content": {"type": "string"},
            "mode": {"type": "string", "enum": ["w", "a"]},
            "lines": {"type": "array", "items": {"type": "integer"}},
            "opts": {"type": "object"}, "force": {"type": "boolean"},
            "ratio": {"type": "number"}, "note": {"type": ["string", "null"]},
            "level": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}}}},
]

# Several calls in one turn: string, number, bool, null, nested JSON, unicode, numeric-looking
# and JSON-looking strings, and multi-line code.
CALLS = [
    ("bash", {"cmd": "echo 'héllo ✓ 日本' && ls -la /tmp | grep \"x\"", "timeout": 30}),
    ("write", {"path": "src/a b.py", "content": "def f(x):\n    return {'k': [x, 1.5]}\n",
               "mode": "w", "lines": [1, 2, 3], "opts": {"deep": {"k": [1, {"z": None}]}},
               "force": True, "ratio": 0.25, "note": None, "level": 3}),
    ("bash", {"cmd": "123"}),
    ("write", {"path": "[1, 2]", "content": "true", "force": False, "level": "high"}),
]
REASONING = "The user wants files listed.\nI'll run ls — then write ✓."
CONTENT = "Let me look at the files."


def generated_turn(family, message, tools=TOOLS):
  """What the model generates for `message` after its prompt (with its end-of-turn text)."""
  convo = [{"role": "user", "content": "List the files."}, message]
  full = render(family, convo, tools)
  prompt = render(family, convo[:1], tools, add_generation_prompt=True)
  assert full.startswith(prompt)
  turn = full[len(prompt):]
  if family == "qwen3":  # The model stops at <|im_end|>; the template adds a newline after it.
    return turn[:turn.rindex("<|im_end|>") + len("<|im_end|>")]
  return turn + "<|observation|>"  # GLM ends its turn with the next role token.


def assistant(reasoning, content, calls):
  m = {"role": "assistant", "content": content, "reasoning_content": reasoning}
  if calls:
    m["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}}
                       for n, a in calls]
  return m


def calls_of(parsed):
  return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
          for c in parsed.tool_calls]


@pytest.mark.parametrize("family", ["glm45", "qwen3"])
@pytest.mark.parametrize("calls", [CALLS, CALLS[:1], []], ids=["four", "one", "none"])
def test_parser_reads_back_what_the_template_renders(family, calls):
  text = generated_turn(family, assistant(REASONING, CONTENT, calls))
  p = tp.get_parser(family).parse(text, TOOLS)
  assert p.error is None, p.error
  assert p.reasoning_content == REASONING and p.content == CONTENT
  assert calls_of(p) == calls
  assert all(c["id"].startswith("call_") and c["type"] == "function" for c in p.tool_calls)
  assert len({c["id"] for c in p.tool_calls}) == len(calls)
  if calls:  # Unicode arguments come back as themselves, not \u escapes.
    assert "é" in text and "é" in p.tool_calls[0]["function"]["arguments"]


def test_glm_as_the_model_writes_it_with_newlines_and_stop():
  text = ("\n<think>Check first.</think>\nRunning it.\n<tool_call>bash\n<arg_key>cmd</arg_key>\n"
          "<arg_value>ls -la</arg_value>\n<arg_key>timeout</arg_key>\n<arg_value>5</arg_value>\n"
          "</tool_call>\n<tool_call>write\n<arg_key>path</arg_key>\n<arg_value>x.txt</arg_value>\n"
          "<arg_key>content</arg_key>\n<arg_value>\n two lines \n</arg_value>\n</tool_call>"
          "<|observation|>")
  p = tp.get_parser("glm45").parse(text, TOOLS)
  assert (p.reasoning_content, p.content, p.error) == ("Check first.", "Running it.", None)
  assert calls_of(p) == [("bash", {"cmd": "ls -la", "timeout": 5}),
                         ("write", {"path": "x.txt", "content": "\n two lines \n"})]


@pytest.mark.parametrize("raw,types,want", [
    ("123", {"string"}, "123"), ("123", {"integer"}, 123), ("1.5", {"number"}, 1.5),
    ("3", {"number"}, 3), ("true", {"boolean"}, True), ("true", {"string"}, "true"),
    ("null", {"string", "null"}, None), ("[1, 2]", {"array"}, [1, 2]),
    ('{"a": {"b": [1]}}', {"object"}, {"a": {"b": [1]}}), ("abc", {"integer"}, "abc"),
    ("[1, 2]", {"integer"}, "[1, 2]"), ('"quoted"', None, '"quoted"'), ("7", None, 7),
    ("{broken", None, "{broken"), ("NaN", None, "NaN"), ("héllo", None, "héllo"),
])
def test_glm_values_typed_by_schema(raw, types, want):
  got = tp.typed_value(raw, types)
  assert got == want and type(got) is type(want)


def test_param_types_from_schema():
  assert tp.param_types(TOOLS, "write", "note") == {"string", "null"}
  assert tp.param_types(TOOLS, "write", "level") == {"integer", "string"}
  assert tp.param_types(TOOLS, "write", "mode") == {"string"}
  assert tp.param_types(TOOLS, "write", "missing") is None
  assert tp.param_types(TOOLS, "nope", "x") is None and tp.param_types(None, "bash", "cmd") is None
  # Without tools, values are JSON when they decode to a non-string.
  p = tp.get_parser("glm45").parse("<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value>"
                                   "<arg_key>b</arg_key><arg_value>x y</arg_value></tool_call>")
  assert calls_of(p) == [("f", {"a": 1, "b": "x y"})]


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_reasoning_split(family):
  p = tp.get_parser(family)
  assert (p.parse("<think>\nplan\n</think>\n\nanswer").reasoning_content,
          p.parse("<think>\nplan\n</think>\n\nanswer").content) == ("plan", "answer")
  # The prompt opened the block: no opening tag in the output.
  r = p.parse("plan more</think>\nanswer", in_think=True)
  assert (r.reasoning_content, r.content) == ("plan more", "answer")
  # Cut off by max_tokens inside the block: all reasoning.
  r = p.parse("\n<think>still thinking about", in_think=False)
  assert (r.reasoning_content, r.content, r.error) == ("still thinking about", "", None)
  assert p.parse("still thinking", in_think=True).reasoning_content == "still thinking"
  # Empty block (GLM's non-thinking turns) and no block at all.
  assert p.parse("<think></think>\nhi").reasoning_content is None
  r = p.parse("hi there")
  assert (r.reasoning_content, r.content) == (None, "hi there")
  # A tag in the middle is content, not reasoning.
  assert p.parse("say <think> then </think>").reasoning_content is None
  assert tp.opens_think("<|im_start|>assistant\n<think>\n")
  assert not tp.opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")


KLONG_TEXTS = [
    "plain answer", "  spaced  ", 'a<|tool_call|>{"name": "bash", "arguments": {"cmd": "ls"}}'
    '<|/tool_call|><|tool_call|>{"name": "write"}<|/tool_call|> tail',
    'do<|tool_call|>{"name": "bash", "arguments": {', 'do<|tool_call|>{"name": bash}<|/tool_call|>',
    'do<|tool_call|>{"arguments": {}}<|/tool_call|>', 'do<|/tool_call|>',
    'x<|tool_call|>{"name": "bash", "arguments": {"cmd": "é"}}<|/tool_call|><|end|>',
]


@pytest.mark.parametrize("text", KLONG_TEXTS)
def test_klong_family_is_chat_py_parse(fmt, text):
  ref = fmt.parse_assistant(text)
  for parser in (tp.get_parser("klong"), tp.get_parser("klong", chat_format=fmt)):
    got = parser.parse(text, TOOLS)
    assert got.content == ref.content and got.reasoning_content is None
    assert calls_of(got) == calls_of(tp.Parsed("", None, ref.tool_calls))
    assert (got.error is None) == (ref.error is None)
    if ref.error:
      assert got.error.startswith(ref.error) and "<|tool_call|>{" in got.error
  with_think = tp.get_parser("klong").parse("<think>why</think>\n" + KLONG_TEXTS[2], TOOLS)
  assert with_think.reasoning_content == "why" and len(with_think.tool_calls) == 2


def test_klong_leaves_tool_names_to_the_registry():
  """klong: a name outside the offered tools (a registry alias such as `end_task`) is a call,
  not a parse error; the agent's registry resolves it (GLM/Qwen name errors stay)."""
  text = '<|tool_call|>{"name": "end_task", "arguments": {"end_message": "ok"}}<|/tool_call|>'
  got = tp.get_parser("klong").parse(text, TOOLS)
  assert got.error is None and [c["function"]["name"] for c in got.tool_calls] == ["end_task"]


GLM_BAD = [
    ("<tool_call>bash\n<arg_key>cmd</arg_key>\n<arg_value>ls</arg_value>\n", "no closing"),
    ("<tool_call>bash\n<arg_key>cmd</arg_key>\n</tool_call>", "has no <arg_value>"),
    ("<tool_call>bash\n<arg_value>ls</arg_value></tool_call>", "expected <arg_key>"),
    ("<tool_call>bash<arg_key>cmd</arg_key><arg_value>ls</tool_call>", "not closed"),
    ("<tool_call>bash<arg_key>cmd<arg_value>ls</arg_value></tool_call>", "not closed"),
    ("<tool_call>\n<arg_key>cmd</arg_key><arg_value>ls</arg_value></tool_call>", "function name"),
    ("<tool_call>rm -rf<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>", "function name"),
    ("<tool_call>nope<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>",
     "unknown tool 'nope'"),
    ("<tool_call>bash<arg_key>cmd</arg_key><arg_value>a</arg_value><arg_key>cmd</arg_key>"
     "<arg_value>b</arg_value></tool_call>", "twice"),
    ("<tool_call>bash<arg_key>cmd</arg_key><arg_value>a</arg_value>junk</tool_call>",
     "expected <arg_key>"),
    ("done </tool_call>", "without an opening"),
    ("<tool_call>bash<tool_call>bash</tool_call>", "again"),
]
QWEN_BAD = [
    ('<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', 'string "name"'),
    ('<tool_call>\n{"name": "bash", "arguments": [1]}\n</tool_call>', "must be a JSON object"),
    ('<tool_call>\n{"name": "bash", "arguments": "{oops"}\n</tool_call>', "not JSON"),
    ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', "unknown tool"),
    ('<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}}', "no closing"),
    ('<tool_call>\n["bash"]\n</tool_call>', 'string "name"'),
]


@pytest.mark.parametrize("family,text,why", [("glm45", t, w) for t, w in GLM_BAD]
                         + [("qwen3", t, w) for t, w in QWEN_BAD])
def test_malformed_calls_are_errors_not_exceptions(family, text, why):
  parser = tp.get_parser(family)
  p = parser.parse("<think>hm</think>\nTrying.\n" + text, TOOLS)
  assert p.tool_calls == [] and p.reasoning_content == "hm"
  assert p.content == ("Trying.\n" + text).strip()  # The text stays, as content.
  assert why in p.error and parser.expected_form in p.error


def test_good_call_after_a_bad_one_is_not_returned_alone():
  text = ('<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}}\n</tool_call>\n'
          '<tool_call>\n{"name": oops}\n</tool_call>')
  p = tp.get_parser("qwen3").parse(text, TOOLS)
  assert p.tool_calls == [] and p.content == text and "tool call 1" in p.error


def test_family_for_dirs_files_and_template_text(tmp_path):
  for family in ("glm45", "qwen3"):
    d = tmp_path / family
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": (TEMPLATES / f"{family}.jinja").read_text(), "eos_token": "x"}))
    assert tp.family_for(d) == family and tp.family_for(d / "tokenizer.json") == family
    assert tp.family_for((TEMPLATES / f"{family}.jinja").read_text()) == family
  jinja_dir = tmp_path / "jinja"
  jinja_dir.mkdir()
  (jinja_dir / "chat_template.jinja").write_text((TEMPLATES / "glm45.jinja").read_text())
  assert tp.family_for(jinja_dir) == "glm45"
  tokens_only = tmp_path / "tokens"
  tokens_only.mkdir()
  (tokens_only / "tokenizer.json").write_text(json.dumps(
      {"added_tokens": [{"id": 1, "content": "<|im_start|>"}, {"id": 2, "content": "<|im_end|>"}]}))
  assert tp.family_for(tokens_only) == "qwen3"
  sp = tmp_path / "sp"
  sp.mkdir()
  (sp / "tiny.model").write_bytes(b"\x00")
  assert tp.family_for(sp / "tiny.model") == "klong" and tp.family_for(None) == "klong"
  assert tp.family_for("{{ messages }}") == "klong"
  with pytest.raises(ValueError, match="glm45"):
    tp.get_parser("llama")


# ---- streaming ---------------------------------------------------------------------------------


def stream(parser, pieces, tools=TOOLS, in_think=False):
  """(reasoning, content, final delta, final Parsed, every delta sent) of a streamed turn."""
  s = parser.stream(tools, in_think)
  sent = {"reasoning_content": "", "content": ""}
  deltas = []
  for piece in pieces:
    d = s.feed(piece)
    deltas.append(d)
    for k, v in d.items():
      sent[k] += v
  last, final = s.finish()
  for k, v in last.items():
    sent[k] += v
  return sent["reasoning_content"], sent["content"], final, deltas


def assert_same(parser, text, pieces, in_think=False):
  whole = parser.parse(text, TOOLS, in_think)
  reasoning, content, final, _ = stream(parser, pieces, in_think=in_think)
  assert (reasoning, content) == (whole.reasoning_content or "", whole.content), pieces
  assert (calls_of(final), final.error) == (calls_of(whole), whole.error)


def _stream_cases():
  cases = []
  for family in ("glm45", "qwen3"):
    for calls in (CALLS[:2], []):
      cases.append((family, generated_turn(family, assistant(REASONING, CONTENT, calls)), False))
    bad = GLM_BAD if family == "glm45" else QWEN_BAD
    cases += [(family, "<think>r</think>\nx " + t, False) for t, _ in bad[:4]]
  cases += [("klong", t, False) for t in KLONG_TEXTS]
  cases += [(f, "  thinking on</think>\n\n  answer <b> \n", True) for f in tp.FAMILIES]
  cases += [(f, "\n<think>cut off mid-thou", False) for f in tp.FAMILIES]
  cases += [("glm45", "answer<|user|>", False), ("glm45", "a <|user|> b<|observation|>", False),
            ("qwen3", "<thi", False), ("klong", "<think>r</think>  x<|tool_call|>", False),
            ("qwen3", "x</think>y", False), ("glm45", "  \n ", False), ("klong", "", False)]
  return cases


@pytest.mark.parametrize("family,text,in_think", _stream_cases())
def test_stream_adds_up_to_parse_at_every_split(family, text, in_think):
  parser = tp.get_parser(family)
  for i in range(len(text) + 1):
    assert_same(parser, text, [text[:i], text[i:]], in_think)
  assert_same(parser, text, list(text), in_think)


@pytest.mark.parametrize("family", ["glm45", "qwen3"])
def test_stream_never_sends_partial_tags(family):
  parser = tp.get_parser(family)
  text = generated_turn(family, assistant(REASONING, CONTENT, CALLS))
  reasoning, content, final, deltas = stream(parser, list(text))
  assert (reasoning, content) == (REASONING, CONTENT) and len(final.tool_calls) == len(CALLS)
  assert not any("<" in v for d in deltas for v in d.values())
  # Reasoning streams while it is generated, not at the end.
  first_content = next(i for i, d in enumerate(deltas) if "content" in d)
  assert sum("reasoning_content" in d for d in deltas[:first_content]) > 10


def test_stream_random_tag_soup_matches_parse():
  rng = random.Random(0)
  atoms = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
           "<arg_value>", "</arg_value>", "bash", "cmd", "timeout", "7", " ", "\n", "x", "<",
           "</", "<|user|>", "<|im_end|>", "<|tool_call|>", "<|/tool_call|>", '{"name": "bash"}',
           '{"name": "bash", "arguments": {"cmd": "ls"}}', "é"]
  for n in range(400):
    text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 5))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for family in tp.FAMILIES:
      assert_same(tp.get_parser(family), text, pieces, in_think=n % 3 == 0)

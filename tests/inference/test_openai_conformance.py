"""OpenAI conformance of the server, driven by the official `openai` client: top_logprobs, the
request checks OpenAI makes (400s with OpenAI error bodies), system_fingerprint, and text held back
by the detokenizer (an incomplete UTF-8 tail) being emitted when generation ends."""

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from klong_jax.inference import protocol
from klong_jax.inference.detok import IncrementalDetokenizer
from klong_jax.inference.engine import Engine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.inference.server import Running, Server

MSGS = [{"role": "user", "content": "Write a short plan."}]
SAMPLER = dict(max_batch=4, max_len=128, min_prefill_bucket=64, min_prefill_rows=4)


def _start(model, tok, chat_format, params=None):
  sampler = Sampler(model, **SAMPLER)
  if params is not None:
    sampler.load_params(params, 1)
  engine = Engine(sampler, tok, stop_token_ids=chat_format.stop_token_ids)
  return Running(Server(engine, tok, chat_format, model_name="klong-tiny"))


@pytest.fixture(scope="module")
def running(tiny_model, tok, chat_format):
  r = _start(tiny_model, tok, chat_format)
  yield r
  r.stop()


@pytest.fixture
def client(running):
  return openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)


_forward = nnx.jit(lambda model, tokens: model(tokens, jnp.arange(tokens.shape[1])[None])[0])


def _log_softmax_rows(model, prompt, generated, temperature=1.0):
  """log_softmax(logits / T) [len(generated), V] at each generated position (one full forward)."""
  ids = list(prompt) + list(generated)
  padded = np.zeros((1, 128), np.int32)
  padded[0, :len(ids)] = ids
  logits = np.asarray(_forward(model, jnp.asarray(padded))[0], np.float64)
  scaled = logits[len(prompt) - 1:len(ids) - 1] / temperature
  scaled -= scaled.max(-1, keepdims=True)
  return scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))


# ---- top_logprobs ----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_chat_top_logprobs_are_the_models_likeliest_tokens(client, tiny_model, tok, chat_format,
                                                           temperature):
  resp = client.chat.completions.create(
      model="klong-tiny", messages=MSGS, max_tokens=6, temperature=temperature, seed=1,
      logprobs=True, top_logprobs=5)
  choice = resp.choices[0]
  ids = choice.model_extra["token_ids"]
  rows = _log_softmax_rows(tiny_model, chat_format.render_prompt(MSGS), ids,
                           temperature if temperature > 0 else 1.0)
  assert len(choice.logprobs.content) == len(ids) == len(rows) > 0
  for entry, tid, row in zip(choice.logprobs.content, ids, rows, strict=True):
    top = np.argsort(-row)[:5]
    assert [a.token for a in entry.top_logprobs] == [tok.decode([int(t)]) for t in top]
    np.testing.assert_allclose([a.logprob for a in entry.top_logprobs], row[top], atol=1e-4)
    assert all(a.bytes == list(a.token.encode("utf-8")) for a in entry.top_logprobs)
    if temperature == 0:  # Greedy: the chosen token is the likeliest alternative.
      assert tid == top[0] and abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-6


def test_top_logprobs_stream_legacy_and_processed_mode(client):
  kw = dict(model="klong-tiny", messages=MSGS, max_tokens=5, temperature=0, logprobs=True)
  full = client.chat.completions.create(top_logprobs=2, **kw).choices[0].logprobs.content
  streamed = [c.logprobs.content[0] for chunk in client.chat.completions.create(
      top_logprobs=2, stream=True, **kw) for c in chunk.choices if c.logprobs]
  assert [[(a.token, round(a.logprob, 5)) for a in e.top_logprobs] for e in streamed] == \
      [[(a.token, round(a.logprob, 5)) for a in e.top_logprobs] for e in full]
  assert all(len(e.top_logprobs) == 2 for e in full)
  assert all(e.top_logprobs == [] for e in client.chat.completions.create(
      **kw).choices[0].logprobs.content)  # logprobs without top_logprobs: no alternatives.
  # Greedy under logprob_mode="processed" is a point mass: -inf (sent as -9999.0) elsewhere.
  point = client.chat.completions.create(top_logprobs=3, extra_body={"logprob_mode": "processed"},
                                         **kw).choices[0].logprobs.content
  assert all([a.logprob for a in e.top_logprobs] == [0.0, -9999.0, -9999.0] for e in point)

  legacy = client.completions.create(model="klong-tiny", prompt="def main():", max_tokens=4,
                                     temperature=0, logprobs=3).choices[0].logprobs
  assert len(legacy.top_logprobs) == len(legacy.tokens) == 4
  for lp, top in zip(legacy.token_logprobs, legacy.top_logprobs, strict=True):
    assert 1 <= len(top) <= 3 and abs(max(top.values()) - lp) < 1e-6


# ---- request checks --------------------------------------------------------------------------

def _bad(call, **kw):
  with pytest.raises(openai.BadRequestError) as e:
    call(model="klong-tiny", **kw)
  assert e.value.status_code == 400
  return e.value.body


@pytest.mark.parametrize("kw,param", [
    (dict(logprobs=False, top_logprobs=2), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format")])
def test_chat_requests_openai_rejects_get_400(client, kw, param):
  body = _bad(client.chat.completions.create, messages=MSGS, **kw)
  assert body["param"] == param and body["type"] == "invalid_request_error"
  assert param in body["message"]


def test_more_400s_and_the_error_shape(running, client):
  msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
      {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
          {"role": "tool", "content": "ok"}]
  body = _bad(client.chat.completions.create, messages=msgs)
  assert body["param"] == "messages[2].tool_call_id" and "tool_call_id" in body["message"]
  assert "only generates plain text" in _bad(
      client.chat.completions.create, messages=MSGS,
      response_format={"type": "json_object"})["message"]
  assert _bad(client.completions.create, prompt="hi", max_tokens=0)["param"] == "max_tokens"
  assert _bad(client.completions.create, prompt="hi", logprobs=21)["param"] == "logprobs"
  r = httpx.post(running.url + "/v1/chat/completions",
                 json={"model": "klong-tiny", "messages": MSGS, "top_logprobs": 3})
  assert r.status_code == 400 and set(r.json()) == {"error"}
  assert set(r.json()["error"]) == {"message", "type", "param", "code"}
  ok = client.chat.completions.create(model="klong-tiny", messages=msgs[:1] + [
      {**msgs[1]}, {**msgs[2], "tool_call_id": "call_1"}], max_tokens=2,
      response_format={"type": "text"})
  assert ok.choices[0].finish_reason in ("length", "stop")


def test_system_fingerprint_in_responses_and_chunks(running, client):
  want = protocol.system_fingerprint("klong-tiny", running.server.engine.policy_version)
  assert want.startswith("fp_") and len(want) == 13
  assert want != protocol.system_fingerprint("klong-tiny", running.server.engine.policy_version + 1)
  chat = client.chat.completions.create(model="klong-tiny", messages=MSGS, max_tokens=2)
  text = client.completions.create(model="klong-tiny", prompt="hi", max_tokens=2)
  assert chat.system_fingerprint == text.system_fingerprint == want
  chunks = list(client.chat.completions.create(model="klong-tiny", messages=MSGS, max_tokens=3,
                                               stream=True,
                                               stream_options={"include_usage": True}))
  assert len(chunks) > 3 and all(c.system_fingerprint == want for c in chunks)


# ---- text held back by the detokenizer -------------------------------------------------------

def test_detokenizer_flushes_an_incomplete_utf8_tail(tok):
  ids = tok.encode("ab é€")
  assert len(ids) > len(tok.encode("ab é")) + 1  # "€" is several byte tokens.
  d = IncrementalDetokenizer(tok.decode)
  text = "".join(d.push(t) for t in ids[:-1])
  assert text == "ab é"  # The partial "€" is held back while generation may complete it...
  tail = d.flush()  # ...and emitted once it has ended, as replacement characters.
  assert tail and set(tail) == {"\ufffd"} and d.flush() == ""


def test_reply_ending_in_a_partial_utf8_byte_is_not_dropped(tiny_model, tok, chat_format):
  """The greedy reply is forced to one byte token (0xE2, the start of a 3-byte character) by
  swapping two lm_head columns; its text used to come back as ""."""
  prompt = chat_format.render_prompt(MSGS)
  plain = Engine(Sampler(tiny_model, **SAMPLER))
  first = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
  byte = tok.piece_to_id("<0xE2>")
  assert byte is not None and byte != first
  params = nnx.state(tiny_model, nnx.Param).to_pure_dict()
  head = np.array(params["embedder"]["lm_head_dv"])
  head[:, [first, byte]] = head[:, [byte, first]]
  params["embedder"]["lm_head_dv"] = head
  r = _start(tiny_model, tok, chat_format, params)
  try:
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)
    kw = dict(model="klong-tiny", messages=MSGS, max_tokens=1, temperature=0)
    resp = client.chat.completions.create(**kw).choices[0]
    assert resp.model_extra["token_ids"] == [byte]
    assert resp.message.content == "\ufffd" and resp.finish_reason == "length"
    streamed = "".join(c.delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **kw) for c in chunk.choices)
    assert streamed == "\ufffd"
    text = client.completions.create(model="klong-tiny", prompt=prompt, max_tokens=1,
                                     temperature=0).choices[0]
    assert text.text == "\ufffd"
    # The flushed tail still goes through stop-string matching.
    stopped = client.chat.completions.create(stop=["\ufffd"], **kw).choices[0]
    assert stopped.message.content == "" and stopped.finish_reason == "stop"
  finally:
    r.stop()

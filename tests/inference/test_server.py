"""OpenAI-compatible server, driven by the official `openai` client on loopback."""

import json

import httpx
import jax
import numpy as np
import openai
import pytest
from flax import nnx

from klong_jax.inference import reload
from klong_jax.inference.engine import Completion, Engine
from klong_jax.inference.sampler import Sampler, SamplingParams
from klong_jax.inference.server import Running, Server

from .conftest import full_forward_logprobs

MSGS = [{"role": "user", "content": "Write a short plan."}]


@pytest.fixture(scope="module")
def running(tiny_model, tok, chat_format, tmp_path_factory):
  root = tmp_path_factory.mktemp("run") / "policy"
  sampler = Sampler(tiny_model, max_batch=4, max_len=128, min_prefill_bucket=64,
                    min_prefill_rows=4)
  engine = Engine(sampler, tok, stop_token_ids=chat_format.stop_token_ids)
  watcher = reload.PolicyWatcher(engine, root, interval_s=0.2)
  server = Server(engine, tok, chat_format, model_name="klong-tiny", max_body_bytes=64 << 10,
                  watcher=watcher)
  r = Running(server, reload_interval_s=0.2)
  yield r
  r.stop()


@pytest.fixture
def client(running):
  return openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)


def test_greedy_chat_equals_direct_sampler_and_full_forward(running, client, tiny_model,
                                                            chat_format):
  resp = client.chat.completions.create(model="klong-tiny", messages=MSGS, temperature=0,
                                        max_tokens=12, logprobs=True)
  choice = resp.choices[0]
  ids = choice.model_extra["token_ids"]
  prompt = chat_format.render_prompt(MSGS)
  # The server's engine thread owns the sampler; use a fresh one with the same weights.
  sampler = Sampler(tiny_model, max_batch=4, max_len=128, min_prefill_bucket=64,
                    min_prefill_rows=4)
  direct = Engine(sampler, stop_token_ids=chat_format.stop_token_ids)
  ref = direct.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
  assert ids == ref.token_ids
  argmax, logp = full_forward_logprobs(tiny_model, prompt, ids, pad_to=128)
  assert ids == argmax
  got = [c.logprob for c in choice.logprobs.content]
  assert np.max(np.abs(np.asarray(got) - logp)) <= 1e-4
  assert choice.model_extra["policy_version"] == running.server.engine.policy_version
  assert resp.usage.prompt_tokens == len(prompt)


def test_routed_experts_extension(running, client, tiny_model, chat_format):
  """R3: with return_routed_experts the choice carries the routing of prompt + sampled tokens
  (from routed_experts_start), which replayed in a trainer forward gives the served logprobs."""
  from klong_jax.agent import client as client_lib
  from klong_jax.data import routing as routing_lib

  from .test_routing_replay import trainer_logprobs
  prompt = chat_format.render_prompt(MSGS)
  reply, _ = client_lib.chat(client, "klong-tiny", MSGS, None, 8, 0.0, routing_from=0)
  k = reply["klong"]
  rec = k["routed_experts"]
  r = routing_lib.decode(rec)
  cfg = tiny_model.cfg
  assert r.shape == (len(prompt) + len(k["token_ids"]), cfg.num_moe_layers,
                     cfg.num_experts_per_tok)
  assert rec["prompt_len"] == len(prompt) and rec["start"] == 0
  assert rec["prompt_crc32"] == routing_lib.prompt_checksum(prompt)
  assert (r[:-1] >= 0).all()
  logp, _ = trainer_logprobs(tiny_model, prompt, k["token_ids"], r)
  np.testing.assert_allclose(logp, k["logprobs"], atol=1e-4, rtol=0)
  part, _ = client_lib.chat(client, "klong-tiny", MSGS, None, 8, 0.0, routing_from=5)
  rec5 = part["klong"]["routed_experts"]
  assert rec5["start"] == 5 and rec5["shape"][0] == r.shape[0] - 5
  np.testing.assert_array_equal(routing_lib.decode(rec5), r[5:])
  plain = client.chat.completions.create(model="klong-tiny", messages=MSGS, temperature=0,
                                         max_tokens=4)
  assert "routed_experts" not in plain.choices[0].model_extra


def test_text_completion_and_stream(client, tok):
  resp = client.completions.create(model="klong-tiny", prompt="def main():", max_tokens=8,
                                   temperature=0, logprobs=1)
  c = resp.choices[0]
  assert len(c.model_extra["token_ids"]) == len(c.logprobs.token_logprobs) <= 8
  stream = client.completions.create(model="klong-tiny", prompt="def main():", max_tokens=8,
                                     temperature=0, stream=True)
  ids, text = [], ""
  for chunk in stream:
    for ch in chunk.choices:
      ids += ch.model_extra.get("token_ids") or []
      text += ch.text
  assert ids == c.model_extra["token_ids"] and text == c.text
  chat = client.chat.completions.create(model="klong-tiny", messages=MSGS, max_tokens=6,
                                        temperature=0, stream=True, logprobs=True,
                                        stream_options={"include_usage": True})
  chunks = list(chat)
  assert chunks[-1].usage.completion_tokens == sum(
      len(ch.model_extra.get("token_ids") or []) for c in chunks for ch in c.choices)


def test_tools_render_and_tool_calls_parse(running, client, chat_format):
  tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
  resp = client.chat.completions.create(model="klong-tiny", messages=MSGS, tools=tools,
                                        max_tokens=4, temperature=0)
  assert resp.usage.prompt_tokens == len(chat_format.render_prompt(MSGS, tools))
  text = 'ok<|tool_call|>{"name": "bash", "arguments": {"cmd": "ls"}}<|/tool_call|>'
  comp = Completion([1], [5, 6], [-0.1, -0.2], [3, 3], text, "stop")
  choice = running.server.chat_choice(0, comp, logprobs=False)
  assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "ok"
  call = choice["message"]["tool_calls"][0]["function"]
  assert call["name"] == "bash" and json.loads(call["arguments"]) == {"cmd": "ls"}
  assert choice["token_ids"] == [5, 6] and choice["policy_version"] == 3


def test_bad_requests_get_openai_errors_and_server_keeps_serving(running, client):
  with pytest.raises(openai.NotFoundError) as e:
    client.chat.completions.create(model="nope", messages=MSGS)
  assert e.value.body["code"] == "model_not_found"
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="klong-tiny", messages=MSGS, max_tokens=-1)
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="klong-tiny", prompt="x " * 400, max_tokens=4)
  assert e.value.body["code"] == "context_length_exceeded"
  url = running.url + "/v1/chat/completions"
  r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
  r = httpx.post(url, content=b"x" * (65 << 10))
  assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
  assert httpx.get(running.url + "/nope").status_code == 404
  assert client.models.list().data[0].id == "klong-tiny"
  assert httpx.get(running.url + "/health").json()["status"] == "ok"
  metrics = httpx.get(running.url + "/metrics").text
  assert 'klong_http_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics
  assert "klong_engine_generated_tokens_total" in metrics


def test_hot_reload_picks_up_new_version(running, client, tiny_model):
  engine, watcher = running.server.engine, running.server.watcher
  old = engine.policy_version
  other = jax.tree.map(lambda x: x * 1.5, nnx.state(tiny_model, nnx.Param))
  reload.save_policy(watcher.root, old + 1, other)
  import time
  deadline = time.monotonic() + 30
  while engine.policy_version != old + 1:  # Picked up by the watcher thread, no restart.
    assert time.monotonic() < deadline, "new policy version not loaded"
    client.completions.create(model="klong-tiny", prompt="hi", max_tokens=2)
    time.sleep(0.1)
  resp = client.completions.create(model="klong-tiny", prompt="hi", max_tokens=3, temperature=0)
  assert resp.choices[0].model_extra["policy_version"] == old + 1
  reload.save_policy(watcher.root, old + 2, other)
  r = httpx.post(running.url + "/admin/load_policy", json={"version": old + 2})
  assert r.status_code == 200 and r.json()["loaded"] == old + 2

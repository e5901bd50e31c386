"""A seeded RL group against the real tiny-model server is token-identical across two runs at
one policy version: members concurrent in one run, sequential beside unrelated traffic in the
other (other batch mates, prefix-cache hits the first run did not have); its token clock too."""

import concurrent.futures
import threading

import openai
import pytest

from klong_jax.agent import client as client_lib
from klong_jax.agent import scaffold
from klong_jax.inference.engine import Engine
from klong_jax.inference.prefix_cache import PrefixCache
from klong_jax.inference.sampler import Sampler
from klong_jax.inference.server import Running, Server
from klong_jax.sandbox.base import make_sandbox

G = 3


@pytest.fixture(scope="module")
def url(tiny_model, tok, chat_format):
  sampler = Sampler(tiny_model, max_batch=4, max_len=512)
  engine = Engine(sampler, tok, stop_token_ids=chat_format.stop_token_ids,
                  prefix_cache=PrefixCache(sampler, block_size=16, max_blocks=64))
  r = Running(Server(engine, tok, chat_format, model_name="klong-tiny"))
  yield r.url + "/v1"
  r.stop()


def _member(url, i):
  cfg = scaffold.AgentConfig(model="klong-tiny", max_steps=3, reminder_every=2,
                             max_completion_tokens=12, context_tokens=480, temperature=1.0,
                             budget_clock="tokens", seed_key=("plan-1", "plan-1-s0-r0", i),
                             retry_backoff_s=0.01)
  with make_sandbox("local") as sb:
    ep = scaffold.run_episode(client_lib.make_client(url), sb,
                              [{"role": "user", "content": "Write a short plan."}], cfg, tools=[])
  turns = [m["klong"]["token_ids"] for m in ep.messages if m["role"] == "assistant"]
  return turns, ep.clock["tokens"], ep.budget_s


def _noise(url, stop):
  client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
  k = 0
  while not stop.is_set():
    client.chat.completions.create(model="klong-tiny", max_tokens=20, temperature=1.0,
                                   messages=[{"role": "user", "content": f"noise {k} " * 5}])
    k += 1


@pytest.mark.slow  # ~2-3 min on 2 busy cores (server compiles).
def test_seeded_group_is_token_identical_across_runs(url):
  with concurrent.futures.ThreadPoolExecutor(G) as ex:
    first = list(ex.map(lambda i: _member(url, i), range(G)))
  stop = threading.Event()
  noise = threading.Thread(target=_noise, args=(url, stop), daemon=True)
  noise.start()
  try:
    second = [_member(url, i) for i in range(G)]
  finally:
    stop.set()
    noise.join(60)
  assert [t for t, _, _ in second] == [t for t, _, _ in first]
  assert [c for _, c, _ in second] == [c for _, c, _ in first]
  assert [b for _, _, b in second] == [b for _, _, b in first]
  assert all(len(t) == 3 and all(t) for t, _, _ in first)
  assert len({tuple(t[0]) for t, _, _ in first}) == G  # Members differ (their own seeds).


@pytest.mark.slow  # Shares the module's server (compiles) with the test above.
def test_usage_reports_prefix_cache_hits(url):
  client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
  msgs = [{"role": "user", "content": "A prompt long enough to fill two cache blocks. " * 3}]
  first = client.chat.completions.create(model="klong-tiny", messages=msgs, max_tokens=2)
  again = client.chat.completions.create(model="klong-tiny", messages=msgs, max_tokens=2)
  n = first.usage.prompt_tokens
  assert n >= 32 and first.usage.prompt_tokens_details.cached_tokens == 0
  assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16  # >= 1 prefilled

"""Shared fixtures for inference tests: the tiny model, its tokenizer and chat format."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.data import tokenizer as tokenizer_lib
from klong_jax.data.chat import ChatFormat
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  return tokenizer_lib.default_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=512)


@pytest.fixture(scope="session")
def chat_format(tok):
  return ChatFormat(tok)


@pytest.fixture(scope="session")
def tiny_cfg():
  return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
  return Transformer(tiny_cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
  return model(tokens, jnp.arange(tokens.shape[1])[None])[0]


def full_forward_logprobs(model, prompt, generated, temperature=1.0, pad_to=64):
  """(argmax ids, log_softmax(logits / T) of `generated`) from one full (trainer) forward pass.

  Right-padding to `pad_to` keeps one compiled shape; causal attention ignores the padding.
  """
  ids = list(prompt) + list(generated)
  padded = np.zeros((1, max(pad_to, len(ids))), np.int32)
  padded[0, :len(ids)] = ids
  logits = _forward(model, jnp.asarray(padded))
  logits = np.asarray(logits[0, len(prompt) - 1:len(ids) - 1], np.float64)
  scaled = logits / (temperature if temperature > 0 else 1.0)
  scaled = scaled - scaled.max(-1, keepdims=True)
  logp = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
  return logits.argmax(-1).tolist(), logp[np.arange(len(generated)), generated]

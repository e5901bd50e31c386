"""Shared fixtures for data tests: the bundled tiny tokenizer (trained once per session)."""

import pytest

from klong_jax.data import tokenizer
from klong_jax.data.chat import ChatFormat


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  return tokenizer.default_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def fmt(tok):
  return ChatFormat(tok)

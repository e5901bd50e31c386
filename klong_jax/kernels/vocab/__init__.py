"""Per-token logprobs of targets from the final hidden state and the output head.

Backends: `reference` (full fp32 logits, the definition) and `tiled` (token x vocab tiles with a
recomputing custom VJP, no [tokens, V] buffer; every platform). `VocabLoss.from_config` reads the
`optim` section's knobs (`vocab_tiling`, `vocab_chunk_tokens`, `vocab_chunk_vocab`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from klong_jax.kernels.vocab import reference, tiled

IMPLS = ("tiled", "reference")


@dataclasses.dataclass(frozen=True)
class VocabLoss:
  """Which backend computes logprobs from hidden states, and its tile sizes."""

  impl: str = "tiled"
  chunk_tokens: int = tiled.DEFAULT_CHUNK_TOKENS
  chunk_vocab: int = tiled.DEFAULT_CHUNK_VOCAB

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f"vocab loss impl must be one of {IMPLS}, got {self.impl!r}")
    if self.chunk_tokens < 1 or self.chunk_vocab < 1:
      raise ValueError(f"vocab chunk sizes must be >= 1, got tokens={self.chunk_tokens} "
                       f"vocab={self.chunk_vocab}")

  @classmethod
  def from_config(cls, optim: Any) -> VocabLoss | None:
    """From an `optim` section; None when `vocab_tiling` is off (the model's logits path)."""
    get = optim.get if hasattr(optim, "get") else lambda k, d=None: getattr(optim, k, d)
    if not get("vocab_tiling", True):
      return None
    return cls("tiled", int(get("vocab_chunk_tokens", tiled.DEFAULT_CHUNK_TOKENS)),
               int(get("vocab_chunk_vocab", tiled.DEFAULT_CHUNK_VOCAB)))


def token_logprobs_from_hidden(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                               head_layout: str = "dv", temperature: float = 1.0,
                               vocab_loss: VocabLoss = VocabLoss(), return_lse: bool = False
                               ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log softmax(hidden @ head / temperature)[targets] in fp32 by `vocab_loss.impl`.

  hidden [B, T, D], head [D, V] ("dv") or tied [V, D] ("vd"), targets [B, T]; see the backends.
  """
  if vocab_loss.impl == "reference":
    return reference.token_logprobs_from_hidden(hidden, head, targets, head_layout=head_layout,
                                                temperature=temperature, return_lse=return_lse)
  return tiled.token_logprobs_from_hidden(
      hidden, head, targets, head_layout=head_layout, temperature=temperature,
      chunk_tokens=vocab_loss.chunk_tokens, chunk_vocab=vocab_loss.chunk_vocab,
      return_lse=return_lse)

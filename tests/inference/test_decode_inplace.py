"""The jitted decode step updates the donated KV cache in place (docs/performance.md).

Before, per-layer cache slices went through the layer scan as inputs/outputs and were written
back with `.at[].set`: XLA copied the whole cache several times per step (temp buffers ~2.5x the
cache), so decode time grew with batch x max_len. Now the cache is loop carry and each layer
scatters only its new slots, leaving at most one layer's K and V slice as temp.
"""

import jax
import numpy as np
import pytest

from klong_jax.inference import sampler as sampler_lib
from klong_jax.model.config import get_preset
from klong_jax.model.transformer import Transformer


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_decode_step_aliases_the_cache_and_copies_at_most_one_layer(scan):
  from flax import nnx
  cfg = get_preset("tiny").replace(scan_layers=scan)
  batch, max_len = 8, 128
  s = sampler_lib.Sampler(Transformer(cfg, rngs=nnx.Rngs(0)), max_batch=batch, max_len=max_len)
  st = sampler_lib.RowSettings.empty(batch)
  ids = np.ones(batch, np.int32)
  compiled = sampler_lib._decode_step.lower(
      s.graphdef, s.params, s.rest, s.cache, ids, ids, st.temperature, st.top_k, st.top_p,
      st.seed, ids).compile()
  mem = compiled.memory_analysis()
  cache = _nbytes(s.cache)
  assert mem.alias_size_in_bytes == cache  # Donated: the output cache is the input buffer.
  one_layer_kv = 2 * cache // cfg.num_layers
  # Everything else (activations, logits, sampling) is small next to one layer's K and V here.
  assert mem.temp_size_in_bytes <= one_layer_kv + cache // 8, (mem.temp_size_in_bytes, cache)

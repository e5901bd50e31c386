"""Attention backends behind one switch: `attend` (training rows) and `attend_cache` (KV cache).

reference.py is the definition (explicit mask, O(T^2)); blockwise.py (pure JAX, any backend),
splash.py (Pallas TPU) and cudnn.py (GPU) are tested equal to it; dispatch.py picks one.
"""

from klong_jax.kernels.attention.dispatch import IMPLS, attend, attend_cache, resolve

__all__ = ["IMPLS", "attend", "attend_cache", "resolve"]

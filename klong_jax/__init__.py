"""klong-jax: training long-horizon research agents with the KLong recipe on JAX/TPU.

Subpackages are imported explicitly; this top-level module imports nothing so that the
JAX-free fleet (agent/, rollout/, grading/, factory/) never pulls in JAX.
"""

__version__ = "0.1.0"

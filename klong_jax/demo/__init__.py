"""The CPU demo and its studies: the whole pipeline on one box (`python -m klong_jax.demo`),
the KLong ablation over seeds (`python -m klong_jax.demo.ablation`), and their helpers."""

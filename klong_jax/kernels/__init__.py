"""Computations with several implementations (attention, ...): one package each, with a
reference, one module per backend and a dispatcher that picks by config and platform."""

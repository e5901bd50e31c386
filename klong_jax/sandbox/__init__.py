"""Sandboxes for agent tool calls and grading (JAX-free): the backend-neutral interface
(`base`), the hardened docker backend, the local (non-isolating) one, the offline image build."""

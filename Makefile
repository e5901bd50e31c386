# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test lint bench image clean-venv

# Idempotent install: re-runs only when setup.py changes.
$(STAMP): setup.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

image: $(STAMP)
	$(VPY) -m klong_jax.rollout.image --ensure

demo: $(STAMP) image
	$(VPY) -m klong_jax.demo --workdir=runs/demo

test: $(STAMP)
	$(VPY) -m ruff check klong_jax tests configs launch benchmarks sandbox
	$(VPY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP) image
	$(VPY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)

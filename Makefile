# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test test-fast test-clone lint bench image clean-venv install host-tools ablation

# Idempotent install: re-runs only when setup.py changes.
$(STAMP): setup.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Host tools the tests use when present: headless Chromium renders the eval report (one test).
# Installed with apt-get as root; elsewhere the command is printed and that test skips.
host-tools:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (headless report rendering test)"; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
	    echo "warning: apt-get install chromium failed; the report rendering test will skip"; \
	  else echo "optional: run 'sudo apt-get install chromium' for the report rendering test"; fi

image: $(STAMP)
	$(VPY) -m klong_jax.sandbox.image --ensure

demo: $(STAMP) image
	$(VPY) -m klong_jax.demo --workdir=runs/demo

LINT := klong_jax tests configs launch benchmarks sandbox dev

test: $(STAMP) host-tools
	$(VPY) -m ruff check $(LINT)
	$(VPY) -m pytest -q -n 2 --dist loadgroup tests

# The inner loop: ruff and every test not marked slow, docker, subprocess or gcs (pytest.ini).
test-fast: $(STAMP)
	$(VPY) -m ruff check $(LINT)
	$(VPY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not docker and not subprocess and not gcs" tests

# A clone alone must pass: the committed HEAD cloned into an empty temp dir, the shared/ folder
# beside this checkout hidden, the fast lane run there; fails unless it runs as many tests as here.
# (.ci/run does the collection-only variant; `dev/test_in_clone.sh full` runs `make test` there.)
test-clone: $(STAMP)
	dev/test_in_clone.sh fast

# The paper's ablation (truncated vs split SFT, progressive vs fixed RL) over 3 seeds on the
# long-horizon suite; hours on 2 cores. Table: runs/ablation/ablation.md (measured: docs/).
ablation: $(STAMP) image
	$(VPY) -m klong_jax.demo.ablation --out=runs/ablation --seeds=3

bench: $(STAMP) image
	$(VPY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)

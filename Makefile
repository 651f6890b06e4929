# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench study study-quick mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Users with a GPU bring their own CUDA torch; a bare machine gets the 2.13 wheel (CPU here).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,quant]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reap_fast demo --output demo_out

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The quality study (README "Does the pruned model stay good?"); not part of CI. Resumes when interrupted.
study: $(STAMP)
	$(PY) -m reap_fast.study

# One model, four methods, a few minutes: compared with the committed bench/quality/results.json.
study-quick: $(STAMP)
	$(PY) -m reap_fast.study --quick

# Planted bugs (tools/mutants.py): every one-line wrong decision must make its tests fail (not part of `make test`).
mutants: $(STAMP)
	$(PY) tools/mutants.py

bench: $(STAMP)
	$(VENV)/bin/pytest bench -q --benchmark-json=bench/results/local.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache

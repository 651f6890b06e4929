# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A second venv with upstream REAP's stack (transformers 4.55), used by the tests that load pruned folders
# in it and by the drop-in's end-to-end test against upstream itself. Tests find its python through
# REAP_UPSTREAM_PYTHON (default: this venv) and skip with the reason when it is absent.
UPSTREAM_VENV ?= .venv-upstream
UPSTREAM_PY := $(UPSTREAM_VENV)/bin/python
UPSTREAM_STAMP := $(UPSTREAM_VENV)/.installed
PYTHON311 ?= $(shell command -v python3.11 || command -v python3)

.PHONY: demo test bench study study-quick mutants compile-sweep clean venv-upstream upstream-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Users with a GPU bring their own CUDA torch; a bare machine gets the 2.13 wheel (CPU here).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,quant]"
	touch $(STAMP)

$(UPSTREAM_STAMP):
	test -x $(UPSTREAM_PY) || $(PYTHON311) -m venv $(UPSTREAM_VENV)
	$(UPSTREAM_PY) -m pip install -q torch==2.13.0
	$(UPSTREAM_PY) -m pip install -q transformers==4.55.0 "datasets>=3.6,<4" accelerate pyyaml tqdm numpy scipy \
		scikit-learn matplotlib seaborn python-dotenv requests uvloop safetensors
	touch $(UPSTREAM_STAMP)

venv-upstream: $(UPSTREAM_STAMP)

demo: $(STAMP)
	$(PY) -m reap_fast demo --output demo_out

test: $(STAMP)
	$(MAKE) venv-upstream || echo "make venv-upstream failed: the tests that need transformers 4.55 will skip"
	$(VENV)/bin/pytest -q

# The quality study (README "Does the pruned model stay good?"); not part of CI. Resumes when interrupted.
study: $(STAMP)
	$(PY) -m reap_fast.lab.study

# One model, four methods, a few minutes: compared with the committed bench/quality/results.json.
study-quick: $(STAMP)
	$(PY) -m reap_fast.lab.study --quick

# Planted bugs (tools/mutants.py): every one-line wrong decision must make its tests fail (not part of `make test`).
mutants: $(STAMP)
	$(PY) tools/mutants.py

# The drop-in against Cerebras REAP's own scripts (tests/test_upstream_e2e.py). Needs upstream's environment:
# REAP_UPSTREAM_PYTHON (default .venv-upstream/bin/python) and its source (REAP_UPSTREAM_SRC).
upstream-check: $(STAMP) $(UPSTREAM_STAMP)
	$(VENV)/bin/pytest -q -m upstream tests/test_upstream_e2e.py

# Every tile shape the tuner may pick, compiled for sm_80/86/89/90 (no GPU; ~1 h on 2 cores).
compile-sweep: $(STAMP)
	REAP_FAST_COMPILE_SWEEP=1 $(VENV)/bin/pytest -q -m compile_sweep tests/test_compile_check.py

bench: $(STAMP)
	$(VENV)/bin/pytest bench -q --benchmark-json=bench/results/local.json

clean:
	rm -rf $(VENV) $(UPSTREAM_VENV) demo_out .pytest_cache

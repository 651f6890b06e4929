# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing, from the lock
# (requirements/lock.txt, every package with its hash; torch outside it, see requirements/README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON311 ?= $(shell command -v python3.11 || command -v python3)
# The torch release the locks were tested with; installed only into a venv that has no torch (a GPU user's
# own CUDA build is kept, and so is its triton).
TORCH_VERSION := 2.13.0
LOCK := requirements/lock.txt
UPSTREAM_LOCK := requirements/upstream-lock.txt
EXTRAS := --extra test --extra quant --extra eval
# uv pip compile for CI's platform; torch resolved as its CPU build (from a local wheel folder when this
# machine has one, else from PyTorch's CPU index) and left out of the file.
LOCK_TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-$(TORCH_VERSION)*),--find-links /opt/wheels,--torch-backend cpu)
COMPILE = $(VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(LOCK_TORCH_SOURCE) --no-emit-package torch \
	-c requirements/torch.txt --custom-compile-command "make lock"

# A second venv with upstream REAP's stack (transformers 4.55), used by the tests that load pruned folders
# in it and by the drop-in's end-to-end test against upstream itself. Tests find its python through
# REAP_UPSTREAM_PYTHON (default: this venv) and skip with the reason when it is absent.
UPSTREAM_VENV ?= .venv-upstream
UPSTREAM_PY := $(UPSTREAM_VENV)/bin/python
UPSTREAM_STAMP := $(UPSTREAM_VENV)/.installed
# `make test-latest`: the newest releases pyproject allows (torch stays TORCH_VERSION unless TORCH_LATEST says).
LATEST_VENV ?= .venv-latest
TORCH_LATEST ?= $(TORCH_VERSION)

.PHONY: demo test test-latest lock bench study study-quick mutants compile-sweep clean venv-upstream upstream-check

# install_locked(venv, lock, torch version): uv from requirements/tools.txt, torch when the venv has none, then the
# lock with --no-deps and --require-hashes (a CUDA torch's venv keeps its own triton: the lock's entry is dropped).
# Read without importing torch (its dependencies come with the lock, after this check).
export HAS_TORCH := import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)
export CUDA_TORCH := import importlib.util, runpy, sys; spec = importlib.util.find_spec("torch"); \
	sys.exit(spec is None or runpy.run_path(spec.submodule_search_locations[0] + "/version.py").get("cuda") is None)
export VERSIONS := import importlib.metadata as m; \
	print(", ".join(f"{n} {m.version(n)}" for n in ("torch", "transformers", "triton", "kernels", "datasets", "accelerate", \
	"safetensors", "auto-round", "lm-eval")))
define install_locked
	test -x $(1)/bin/python || $(PYTHON311) -m venv $(1)
	$(1)/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/tools.txt
	$(1)/bin/python -c "$$HAS_TORCH" || $(1)/bin/python -m pip install -q --no-deps torch==$(3)
	if $(1)/bin/python -c "$$CUDA_TORCH"; then \
		echo "keeping this venv's CUDA torch and its triton"; \
		awk '/^[^ #]/ {skip = ($$0 ~ /^triton==/)} !skip' $(2) > $(1)/lock.txt; \
	else cp $(2) $(1)/lock.txt; fi
	$(1)/bin/uv pip install -q --python $(1)/bin/python --no-deps --require-hashes -r $(1)/lock.txt
endef

$(STAMP): pyproject.toml $(LOCK) requirements/tools.txt
	$(call install_locked,$(VENV),$(LOCK),$(TORCH_VERSION))
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(UPSTREAM_STAMP): $(UPSTREAM_LOCK) requirements/tools.txt
	$(call install_locked,$(UPSTREAM_VENV),$(UPSTREAM_LOCK),$(TORCH_VERSION))
	touch $(UPSTREAM_STAMP)

venv-upstream: $(UPSTREAM_STAMP)

demo: $(STAMP)
	$(PY) -m reap_fast demo --output demo_out

test: $(STAMP)
	$(MAKE) venv-upstream || echo "make venv-upstream failed: the tests that need transformers 4.55 will skip"
	$(VENV)/bin/pytest -q

# Rewrites the locks from pyproject.toml and requirements/*.in (newest versions the ranges allow, today).
lock: $(STAMP)
	echo "torch==$(TORCH_VERSION)+cpu" > requirements/torch.txt
	$(COMPILE) requirements/tools.in -o requirements/tools.txt
	$(COMPILE) pyproject.toml requirements/build.in $(EXTRAS) -o $(LOCK)
	$(COMPILE) requirements/upstream.in requirements/build.in -o $(UPSTREAM_LOCK)

# The suite in a fresh venv with the newest releases pyproject allows (resolved now, never committed).
test-latest: $(STAMP)
	rm -rf $(LATEST_VENV)
	$(PYTHON311) -m venv $(LATEST_VENV)
	echo "torch==$(TORCH_LATEST)+cpu" > $(LATEST_VENV)/torch.txt
	$(VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		$(LOCK_TORCH_SOURCE) --no-emit-package torch -c $(LATEST_VENV)/torch.txt --no-cache \
		pyproject.toml requirements/build.in $(EXTRAS) -o $(LATEST_VENV)/latest.txt
	$(call install_locked,$(LATEST_VENV),$(LATEST_VENV)/latest.txt,$(TORCH_LATEST))
	$(LATEST_VENV)/bin/uv pip install -q --python $(LATEST_VENV)/bin/python --no-deps --no-build-isolation -e .
	$(MAKE) venv-upstream || echo "make venv-upstream failed: the tests that need transformers 4.55 will skip"
	$(LATEST_VENV)/bin/pytest -q
	@diff=$$(comm -13 <(grep -o '^[a-z0-9_.-]*==[^ ]*' $(LOCK) | sort) \
		<(grep -o '^[a-z0-9_.-]*==[^ ]*' $(LATEST_VENV)/latest.txt | sort) | tr '\n' ' '); \
	echo "test-latest passed with: $$($(LATEST_VENV)/bin/python -c "$$VERSIONS"); not in the lock: $${diff:-nothing}"

# The quality study (README "Does the pruned model stay good?"); not part of CI. Resumes when interrupted.
study: $(STAMP)
	$(PY) -m reap_lab.study

# One model, four methods, a few minutes: compared with the committed bench/quality/results.json.
study-quick: $(STAMP)
	$(PY) -m reap_lab.study --quick

# Planted bugs (tools/mutants.py): every one-line wrong decision must make its tests fail (not part of `make test`).
mutants: $(STAMP)
	$(PY) tools/mutants.py

# The drop-in against Cerebras REAP's own scripts (tests/test_upstream_e2e.py) and its main.py merging on the
# drop-in's observation file (tests/test_upstream_merge.py). Needs upstream's environment:
# REAP_UPSTREAM_PYTHON (default .venv-upstream/bin/python) and its source (REAP_UPSTREAM_SRC).
upstream-check: $(STAMP) $(UPSTREAM_STAMP)
	$(VENV)/bin/pytest -q -m upstream tests/test_upstream_e2e.py tests/test_upstream_merge.py

# Every tile shape the tuner may pick, compiled for sm_80/86/89/90 (no GPU; ~1 h on 2 cores).
compile-sweep: $(STAMP)
	REAP_FAST_COMPILE_SWEEP=1 $(VENV)/bin/pytest -q -m compile_sweep tests/test_compile_check.py

bench: $(STAMP)
	$(VENV)/bin/pytest bench -q --benchmark-json=bench/results/local.json

clean:
	rm -rf $(VENV) $(UPSTREAM_VENV) $(LATEST_VENV) demo_out .pytest_cache

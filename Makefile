# Set-up and the two commands of the README: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# onnxruntime-gpu carries the CPU provider too, but is 255 MB: take it only where a GPU is.
ORT_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install test lint format demo bench mutate mutate-tool mutate-sample clean

$(BIN)/nodulekit: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement would pull the CUDA wheels on a CPU machine.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test,$(ORT_EXTRA)]"
	touch $@

install: $(BIN)/nodulekit

test: install
	# --durations: where the time goes (docs/testing.md, "Suite time")
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# ruff is configured in pyproject.toml; `make format` applies the formatter and safe fixes.
lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

format: install
	$(BIN)/python -m ruff check --fix .
	$(BIN)/python -m ruff format .

# Mutation testing on demand (docs/testing.md), not part of `make test`: plants each bug of
# tools/mutants.toml in a scratch copy and runs its tests. MODULES="nodulekit/export.py ..."
# narrows it to some modules; survivors are run against the whole suite before they count.
MODULES ?=
MUTATE_REPORT ?= mutation-report.md
mutate: install
	nice -n 19 $(BIN)/python tools/mutate.py $(foreach m,$(MODULES),--module $(m)) --confirm -o $(MUTATE_REPORT)

# Mechanical mutants of the whole package from mutmut 3 (docs/testing.md): in a scratch copy
# (MUTMUT_WORKDIR, kept; default one per MODULES set under ~/.cache/nodulekit/mutmut), two
# mutants at a time, stopped after MUTMUT_TIME_BOX seconds;
# run it again to resume. MODULES / MUTMUT_TESTS narrow it to some modules and test files.
MUTMUT_TIME_BOX ?= 14400
MUTMUT_TESTS ?=
MUTMUT_WORKDIR ?=
MUTMUT_REPORT ?= mutmut-report.md
mutate-tool: install
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[test,mutation,$(ORT_EXTRA)]"
	nice -n 19 $(BIN)/python tools/mutmut_run.py $(foreach m,$(MODULES),--module $(m)) \
		$(foreach t,$(MUTMUT_TESTS),--tests $(t)) $(if $(MUTMUT_WORKDIR),--workdir $(MUTMUT_WORKDIR)) \
		--time-box $(MUTMUT_TIME_BOX) --max-children 2 -o $(MUTMUT_REPORT)

# A seeded random sample of mutmut's mutants of the whole package (docs/testing.md): mutmut
# generates them, one coverage run of the suite says which tests reach each function, and
# tools/mutant_sample.py runs each sampled mutant against those tests (resumable, time-boxed).
MUTANT_SAMPLE ?= 240
MUTANT_SEED ?= 1
MUTANT_TIME_BOX ?= 14400
mutate-sample: install
	$(BIN)/python -c "import mutmut, pytest_cov" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[test,mutation,$(ORT_EXTRA)]"
	nice -n 19 $(BIN)/python tools/mutmut_run.py --generate-only -o /dev/null > /dev/null
	nice -n 19 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder \
		--cov=nodulekit --cov-context=test --cov-report=
	nice -n 19 $(BIN)/python tools/mutant_sample.py --sample $(MUTANT_SAMPLE) --seed $(MUTANT_SEED) \
		--coverage .coverage --time-box $(MUTANT_TIME_BOX) -o mutant-sample.md

demo: install
	$(BIN)/python -m nodulekit.demo

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo-output

# cdmpi: `make demo` runs the main job, `make test` runs the tests. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The LIBSVM files ship beside the repository on the development machines and in CI; elsewhere they
# are downloaded into ~/.cache/cdmpi on first use.
SHARED_DATA := $(abspath ../shared/data/libsvm)
ifneq ($(wildcard $(SHARED_DATA)/MANIFEST.tsv),)
export CDMPI_DATA_DIR ?= $(SHARED_DATA)
endif
DEMO_RANKS ?= 21
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[mpich,test]"
	touch $@

demo: install
	mkdir -p runs
	$(BIN)/mpiexec -n $(DEMO_RANKS) $(BIN)/cdmpi train configs/logreg/mushrooms.toml --out runs/demo-mushrooms.h5 --overwrite
	$(BIN)/cdmpi report runs/demo-mushrooms.h5

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs .pytest_cache

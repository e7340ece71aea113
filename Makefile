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
# Test files run in TEST_JOBS processes at once (pytest-xdist; a file's tests stay together, so its
# module-scoped reference runs are made once). MPI jobs and sbatch waits of one overlap the other's work.
TEST_JOBS ?= 2

# Section 7.1 reproduction: every dataset x method x step size, then the table and figures.
LOGREG_DATASETS ?= w8a a9a mushrooms phishing
LOGREG_METHODS ?= cdadam,amsgrad:identity,amsgrad-ef,amsgrad-naive
LOGREG_GRID ?= optim.lr=0.001:0.011:0.002
LOGREG_JOBS ?= 2
LOGREG_RUNS ?= runs/logreg

.PHONY: install demo test test-fast clean reproduce-logreg reproduce-digits reproduce-transformer reproduce-network gpu-check bench docs

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

reproduce-logreg: install
	$(BIN)/cdmpi sweep $(foreach d,$(LOGREG_DATASETS),configs/logreg/$(d).toml) --grid $(LOGREG_GRID) \
		--algorithms $(LOGREG_METHODS) --out-dir $(LOGREG_RUNS) --jobs $(LOGREG_JOBS)
	$(BIN)/cdmpi plot $(LOGREG_RUNS) --best --x bits step --y grad_norm_sq --out results/logreg/grad_norm_sq.png \
		--title "Section 7.1: best step size per method, n = 20, scaled sign"
	$(BIN)/cdmpi plot $(LOGREG_RUNS) --best --x bits step --y loss --out results/logreg/loss.png
	$(BIN)/cdmpi plot $(LOGREG_RUNS) --x step --y grad_norm_sq --by-method --out results/logreg/all_step_sizes.png
	$(PY) results/logreg/make_readme.py $(LOGREG_RUNS) results/logreg/README.md

# Small CNN on scikit-learn's digits, 4 workers: CD-Adam vs AMSGrad, 1-bit Adam, EF21 (about 1 to 2 minutes).
reproduce-digits: install
	BIN=$(BIN) results/digits/reproduce.sh

# A small GPT (gpt_nano) learning 2-digit addition, 2 workers: every method's step-size grid on seed 0, its best
# step size on seeds 1 and 2, the diagnosis of CD-Adam, then results/transformer/ (README, tables, figures).
# About 30 minutes on 2 cores; finished runs in runs/transformer are kept.
reproduce-transformer: install
	$(PY) results/transformer/reproduce.py --runs runs/transformer

# Step times on an emulated cluster (root: network namespaces and tc), every method at 100 Mbit/s, 1 and
# 10 Gbit/s and unshaped, digits to 90% at 100 Mbit/s and 1 Gbit/s, the cost of metric rows: about
# 20 minutes on 2 cores. Writes results/network/ (README tables, results.json, step_time.png).
reproduce-network: install
	PATH="$(abspath $(BIN)):$$PATH" $(PY) bench/network.py
	$(PY) results/network/make_readme.py

# On a machine with a GPU: tests on CUDA, packing throughput, 200 ResNet-18 steps (under 5 minutes).
gpu-check: install
	PYTHON=$(PY) bench/gpu_check.sh results/gpu

# The seven benchmarks of results/bench/ (about 10 minutes on 2 cores), then results/bench/README.md.
bench: install
	PYTHON=$(PY) MPIEXEC=$(BIN)/mpiexec bench/run_all.sh

# Every test; SLURM's where a cluster is up (CDMPI_SLURM_TESTS=1, see .ci/run). On a slow or crowded
# machine, CDMPI_TEST_TIMEOUT_SCALE=3 gives every hang detector three times as long.
test: install
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q -rs -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS) tests

# The pure-math and in-process tests: no mpiexec, no sbatch, nothing marked slow.
test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q -rs -n $(TEST_JOBS) --dist loadfile -m "not mpi and not slurm and not slow" $(PYTEST_ARGS) tests

# docs/configuration.md from the config dataclasses (tests/test_docs.py fails when it is stale).
docs: install
	$(PY) -m cdmpi.reference > docs/configuration.md

clean:
	rm -rf $(VENV) runs .pytest_cache

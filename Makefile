# hessmpi on a Debian 12 machine: make setup | test | run | bench | clean | distclean
SHELL := /bin/bash

PYTHON := .venv/bin/python
NP ?= 8
# Wall-clock limit of each mpirun pass of the tests (seconds), so CI cannot hang.
TEST_TIMEOUT ?= 3600

# Open MPI as root (containers, CI) and with more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
export OMPI_MCA_mpi_yield_when_idle := 1

PYTEST := $(PYTHON) -m pytest -q
# Open MPI gives rank 0 a pseudo-terminal, so pytest's colour follows make's stdout instead.
MPI_PYTEST = HESSMPI_TF_THREADS=1 mpirun --timeout $(TEST_TIMEOUT) -n $(1) \
	$(PYTEST) --color=$$color -p no:cacheprovider -m "not serial" tests </dev/null

.PHONY: setup test run bench clean distclean

setup:
	@bash tools/setup.sh

# All three passes run; the target fails if any of them does. The single-rank pass lists its
# 15 slowest tests, to keep the suite's time in view.
test: setup
	@failed=; if [[ -t 1 ]]; then color=yes; else color=no; fi; \
	echo '+ $(PYTEST) --durations=15 tests'; $(PYTEST) --durations=15 tests || failed="$$failed single-rank"; \
	echo '+ $(call MPI_PYTEST,2)'; $(call MPI_PYTEST,2) || failed="$$failed mpirun-n-2"; \
	echo '+ $(call MPI_PYTEST,3)'; $(call MPI_PYTEST,3) || failed="$$failed mpirun-n-3"; \
	if [[ -n $$failed ]]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: all passes succeeded (single rank, mpirun -n 2, mpirun -n 3)"

run: setup
	mpirun -n $(NP) $(PYTHON) scripts/spectrum.py --overwrite $(ARGS) </dev/null

# Benchmarks: Markdown tables on stdout and in $(BENCH_OUT)/*.md, JSON next to them.
# About 20 minutes on 2 idle cores. The PyTorch rows (PyHessian, hessian-eigenthings, ARPACK, and
# the whole-process comparison of the default spectrum.py with hessian-eigenthings) need
# HESSMPI_TORCH_PYTHON (a Python with torch, pyhessian, hessian_eigenthings and scipy; hessmpi does
# not depend on them), else they are skipped with a note.
BENCH_OUT ?= results/bench
BENCH_MPI = env HESSMPI_TF_THREADS=1 mpirun -n 2 $(PYTHON)
bench: setup
	@mkdir -p $(BENCH_OUT); set -o pipefail; o=$(BENCH_OUT); \
	run() { name=$$1; shift; echo "+ $$*"; "$$@" --json $$o/$$name.json </dev/null | tee $$o/$$name.md || exit 1; }; \
	run hvp_cost $(PYTHON) bench/hvp_cost.py; \
	run hvp_cost_1thread $(PYTHON) bench/hvp_cost.py --threads 1; \
	run hvp_vs_handwritten $(PYTHON) bench/hvp_cost.py --compare-handwritten; \
	run comm_cost $(PYTHON) bench/comm_cost.py --models cnn,softmax; \
	run eigen_cnn_2x1 $(BENCH_MPI) bench/eigen_cost.py --model cnn --dtype float32 --n-samples 1000 \
		--solvers default,krylovschur,pyhessian; \
	run eigen_cnn_1x2 env HESSMPI_TF_THREADS=2 $(PYTHON) bench/eigen_cost.py --model cnn --dtype float32 \
		--n-samples 1000 --solvers krylovschur; \
	run eigen_softmax_f64 $(BENCH_MPI) bench/eigen_cost.py --model softmax --dtype float64 --n-samples 4000 \
		--solvers default,krylovschur,lanczos,power,pyhessian; \
	run eigen_softmax_f32 $(BENCH_MPI) bench/eigen_cost.py --model softmax --dtype float32 --n-samples 1000 \
		--solvers default,krylovschur,power; \
	run memory $(PYTHON) bench/memory.py; \
	run monitor_cost $(PYTHON) bench/monitor_cost.py; \
	run monitor_cost_fashion $(PYTHON) bench/monitor_cost.py --train fashion-mnist --epochs 1 --pairs 2 \
		--settings top1+trace; \
	run pyhessian $(PYTHON) bench/pyhessian_ref.py; \
	run whole_process_cnn $(PYTHON) bench/pyhessian_ref.py --whole-process 3; \
	run whole_process_softmax $(PYTHON) bench/pyhessian_ref.py --whole-process 3 --model softmax \
		--n-samples 4000 --dtype float64; \
	echo "make bench: tables in $$o/*.md, JSON in $$o/*.json"

clean:
	rm -rf results build .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv

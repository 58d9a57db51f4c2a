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

# All three passes run; the target fails if any of them does.
test: setup
	@failed=; if [[ -t 1 ]]; then color=yes; else color=no; fi; \
	echo '+ $(PYTEST) tests'; $(PYTEST) tests || failed="$$failed single-rank"; \
	echo '+ $(call MPI_PYTEST,2)'; $(call MPI_PYTEST,2) || failed="$$failed mpirun-n-2"; \
	echo '+ $(call MPI_PYTEST,3)'; $(call MPI_PYTEST,3) || failed="$$failed mpirun-n-3"; \
	if [[ -n $$failed ]]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: all passes succeeded (single rank, mpirun -n 2, mpirun -n 3)"

run: setup
	mpirun -n $(NP) $(PYTHON) scripts/spectrum.py $(ARGS) </dev/null

bench: setup
	@for f in bench/*.py; do \
		[[ -e $$f ]] || continue; \
		echo "== $$f"; $(PYTHON) "$$f" || exit 1; \
	done

clean:
	rm -rf results build .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv

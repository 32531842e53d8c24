# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
# Both build .venv from requirements-lock.txt (exact, tested versions) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Multi-process tests need one thread per rank; numba's workqueue layer keeps forked workers alive.
# TRITON_INTERPRET is not set here: tests/conftest.py turns Triton's interpreter on only where no CUDA device is
# present, so on a GPU the kernel tests run compiled kernels (a TRITON_INTERPRET from your environment is kept).
TEST_ENV := OMP_NUM_THREADS=1 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements-lock.txt setup.py
	@echo "== building $(VENV) from requirements-lock.txt (about 2 minutes, 6.4 GB: CUDA builds of torch that also run on CPU)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-lock.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg NUMBA_THREADING_LAYER=workqueue $(BIN)/medpose demo

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q tests

# Benchmarks keep torch's default thread count (the realistic setting); the JSON lands in .benchmarks/latest.json, is
# recorded in benchmarks/history/ (machine, commit, versions) and compared with the previous run on a comparable
# machine. `make bench BENCH=benchmarks/bench_heatmaps.py BENCH_NOTES="machine busy"` runs one file and keeps a note.
# With pygal installed, add --benchmark-histogram to the pytest line for SVG histograms (not in requirements-lock.txt).
BENCH       ?= benchmarks
BENCH_NOTES ?=
bench: $(STAMP)
	mkdir -p .benchmarks
	NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg $(BIN)/python -m pytest -q $(BENCH) -o python_files='bench_*.py' \
		--benchmark-only --benchmark-columns=mean,stddev,ops --benchmark-json=.benchmarks/latest.json
	$(BIN)/python benchmarks/history.py record .benchmarks/latest.json --notes "$(BENCH_NOTES)"
	$(BIN)/python benchmarks/compare.py --no-fail

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks

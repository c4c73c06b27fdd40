# The README's two commands: `make run` (the main job) and `make test` (the harness's tests).
# Both install what is missing first (ci/setup.sh is idempotent and fast when all is there).

VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: all setup setup-test-tools run test test-unit test-slow test-mutants bench lint clean-runs

all: run

setup:
	ci/setup.sh

# What only the harness's own tests use as well: a browser (the HTML report) and Ruby (the Vagrantfile).
setup-test-tools:
	ci/setup.sh --test-tools

run: setup
	$(BIN)/pkvm-harness run $(ARGS)

# Unit tests and the integration tests that build (or reuse) and boot real pKVM kernels, then
# the nightly suites (test_suites/) on one QEMU boot, through the nightly script itself, which
# leaves result.json, junit.xml and the reports in runs/make-test-<time>/. The kernel is built
# first, in the open, so a cold build shows its progress in CI logs.
test: setup-test-tools lint
	$(BIN)/pkvm-harness build
	$(BIN)/python -m pytest -m "not slow and not mutant" $(PYTEST_ARGS)
	ci/nightly.sh --cpu max --out runs/make-test-$$(date +%Y%m%d-%H%M%S) -- $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -m "not integration and not slow and not mutant" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Each kernel patch in tests/mutants/ must fail the suites with a message naming its bug:
# `make test-mutants` on the default kernel, `make test-mutants KERNEL=7.3` on another series.
# MUTANT_TARGET=ssh: as on a board, each mutant built with the EL2 dump and read over SSH (docs/boards.md).
KERNEL ?= 6.12
MUTANT_TARGET ?= qemu
test-mutants: setup
	$(BIN)/python -m pytest tests/mutants -m mutant --mutant-kernel $(KERNEL) --mutant-target $(MUTANT_TARGET) $(PYTEST_ARGS)

# All figures in one run (about 45 min on 2 cores): a table, bench/results/run.json, and
# docs/benchmarks.md + docs/benchmarks-scaling.png rewritten. bench/model.py and
# bench/bisect_bench.py also run alone.
bench: setup
	$(BIN)/python bench/run.py --docs $(ARGS)

# Style and types of the harness itself (ruff, mypy: settings in pyproject.toml), then the scripts.
lint: setup-test-tools
	$(BIN)/ruff check harness tests bench test_suites
	$(BIN)/mypy
	shellcheck ci/*.sh .ci/run
	ruby -c Vagrantfile >/dev/null

clean-runs:
	rm -rf runs

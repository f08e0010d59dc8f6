# segpipe: the two commands a new user needs.
#   make demo   – create the virtual environment, then run the demo on generated sample data
#   make test   – create the virtual environment, then run the whole test suite (all but GPU tests)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from plain pip: on this kind of machine it resolves torch 2.14.1/torchvision 0.29.1 from local wheels.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.segpipe-installed

.PHONY: venv demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# one pip call, so the resolver agrees on s3fs/aiobotocore and moto/boto3 pins
	$(VENV)/bin/pip install --quiet $(TORCH) -e '.[dev]'
	$(VENV)/bin/pip check
	# the editable install is not byte-compiled, and with PYTHONDONTWRITEBYTECODE=1 (set on CI machines)
	# every process would compile segpipe again (~60 ms of each start); compileall writes the .pyc anyway
	$(VENV)/bin/python -m compileall -q segpipe flows deployments benchmarks > /dev/null
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segpipe demo --out demo-output

test: $(STAMP)
	$(VENV)/bin/pytest -m "not gpu" -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not gpu and not slow and not e2e" -q

# layer contracts (import-linter, pyproject.toml), lint rules (ruff) and types (mypy); .ci/run runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/engine.py --megapixels 50 --precision bf16 --json docs/bench-engine.json

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# loraflow: `make demo` and `make test` work on a fresh clone (they install first when needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SAM_VENV := .venv-sam
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAM_STAMP := $(SAM_VENV)/.installed
# Offline tools (cfn-lint, sam validate --lint) still want a region and credentials to exist.
export AWS_DEFAULT_REGION ?= us-east-1
export AWS_ACCESS_KEY_ID ?= testing
export AWS_SECRET_ACCESS_KEY ?= testing

.PHONY: install lint test test-fast test-unit test-integration demo bench toy-base local-up clean

install: $(STAMP) $(SAM_STAMP)

# The project venv. torch==2.13.0 resolves to the CPU wheel on local disk.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[dev]'
	touch $@

# SAM CLI pins click==8.1.8, which diffusers' huggingface-hub (click>=8.4.2) cannot share: own venv.
$(SAM_STAMP): requirements/sam-cli.txt
	test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --disable-pip-version-check -r requirements/sam-cli.txt
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy layers/shared functions containers localcloud
	$(BIN)/cfn-lint template.yaml
	$(SAM_VENV)/bin/sam validate --lint --template-file template.yaml

# Everything but the local cloud and the model runs (markers in pyproject.toml): a quick check while working.
test-fast: install
	$(BIN)/pytest -q -m "not integration and not slow" tests

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration

# Two pytest processes at once, one thread each: the local-cloud tests wait on queues and subprocesses
# about half their time, and the unit tests fill it (the whole run: ~7 min against ~13 one after the
# other, or two processes each threading over both cores). The integration log is printed after the
# unit run; the target fails if either does.
test: lint
	@tmp=$$(mktemp -d); \
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -p no:cacheprovider --basetemp=$$tmp/integration tests/integration \
		> $$tmp/integration.log 2>&1 & integration=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -p no:cacheprovider --basetemp=$$tmp/unit tests/unit; unit=$$?; \
	wait $$integration; integration_status=$$?; \
	echo "--- tests/integration (ran beside the unit tests)"; cat $$tmp/integration.log; rm -rf $$tmp; \
	test $$unit -eq 0 && test $$integration_status -eq 0

demo: install
	$(BIN)/loraflow demo --output demo-output

bench: install
	$(BIN)/python -m bench --output bench/results.json

# Refit the toy world's base model (committed: nobody needs to run this; ~35 min on 2 CPU cores).
toy-base: install
	$(BIN)/python -m loraflow_diffusion.toy_world.fit

local-up: install
	$(BIN)/loraflow local up --state-dir .localcloud

clean:
	rm -rf $(VENV) $(SAM_VENV) .localcloud demo-output .aws-sam .pytest_cache .mypy_cache .ruff_cache

# The two commands of the README, and their helpers. `make test` and `make demo` set up first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast demo demo-local deploy stack-up stack-down lint clean

# Re-run setup when the dependency files change (or the venv is missing).
$(STAMP): pyproject.toml constraints.txt infra/setup.sh
	VENV=$(VENV) bash infra/setup.sh
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# The unit tier (no servers, no torchrun, no JVM): run it after every edit.
test-fast: setup
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

# The main job through the orchestrator: stack up, deploy, run train-sat/demo and follow its log lines.
demo: setup
	VENV=$(VENV) bash infra/demo.sh

# The same training without Prefect (shards, then torchrun), for a machine with no services.
demo-local: setup
	$(BIN)/captioning demo $(DEMO_ARGS)

stack-up: setup
	$(BIN)/captioning stack up

stack-down: setup
	$(BIN)/captioning stack down

# Register every deployment of prefect.yaml with the server at PREFECT_API_URL (default: the local stack).
deploy: setup
	eval "$$($(BIN)/captioning stack env)" && CAPTIONING_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-output demo-data .pytest_cache .mypy_cache .ruff_cache

# The two commands of the README, and their helpers. `make test` and `make demo` set up first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo lint clean

# Re-run setup when the dependency files change (or the venv is missing).
$(STAMP): pyproject.toml constraints.txt infra/setup.sh
	VENV=$(VENV) bash infra/setup.sh
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/captioning demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-output demo-data .pytest_cache .mypy_cache .ruff_cache

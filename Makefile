# fl-ec: two commands do everything on a fresh Debian machine.
#   make run    create .venv, install, get Fashion-MNIST, run the default `flwr run .` experiment
#   make compare  FedAvg and the chosen strategy on the same federation, one accuracy plot
#   make test   the same setup, then ruff, lint-imports (the import layers) and the whole
#               pytest suite (what .ci/run calls)

VENV     ?= .venv
PYTHON   ?= python3
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.fl-ec-installed
FMNIST   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_CONFIG ?=
DEPLOY_FLAGS ?=

.PHONY: run compare test setup data lint bench bench-hce bench-lp deploy-up deploy-run deploy-down clean

run: setup
	$(BIN)/fl-ec-run . --run-config '$(RUN_CONFIG)'

# FedAvg, then the chosen strategy (FedEC unless RUN_CONFIG says otherwise), one plot.
compare: setup
	$(BIN)/fl-ec-compare . --run-config '$(RUN_CONFIG)'

test: setup
	$(BIN)/ruff check fl_ec simulations tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

setup: $(STAMP) data

# Reinstall only when the dependencies change; the torch install is ~5 GB.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fl-ec needs Python >= 3.11"'
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else echo "fl-ec: python3-venv is missing: run 'sudo apt-get install -y python3-venv'"; exit 1; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,tensorboard,mlflow]'
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ] && [ -z "$$FL_EC_DATA_DIR" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else echo "fl-ec: Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"\
	       "(or set FL_EC_DATA_DIR, or RUN_CONFIG='download=true')"; fi; \
	fi

lint: setup
	$(BIN)/ruff check fl_ec simulations tests
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python simulations/standard_benchmark.py

bench-hce: setup
	$(BIN)/python simulations/hce_benchmark.py

bench-lp: setup
	$(BIN)/python simulations/layer_parallel_benchmark.py

deploy-up: setup
	$(BIN)/python -m fl_ec.deploy up --supernodes 2 $(DEPLOY_FLAGS)

deploy-run: setup
	$(BIN)/python -m fl_ec.deploy run --run-config '$(RUN_CONFIG)'

deploy-down:
	$(BIN)/python -m fl_ec.deploy down

clean:
	rm -rf $(VENV) .deploy .pytest_cache .ruff_cache .import_linter_cache

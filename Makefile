# One entry point for people and CI. `make demo` and `make test` each set up their own
# virtual environment (.venv) on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_workdir

.PHONY: setup setup-test demo test lint format bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The main job on the embedded default: build the synthetic set, train, evaluate on its test split.
demo: setup
	$(PY) -m data_prep.build synthetic_tags --data_dir $(DEMO_DIR)/data
	$(PY) run_train.py --config configs/demo.py --workdir $(DEMO_DIR)/run \
		--config.data_dir $(DEMO_DIR)/data
	$(PY) run_eval.py --checkpoint $(DEMO_DIR)/run --dataset synthetic_tags \
		--data_dir $(DEMO_DIR)/data --split test

test: setup-test lint
	$(PY) -m pytest -q

lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup-test
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-demo:
	rm -rf $(DEMO_DIR)

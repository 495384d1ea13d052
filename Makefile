# One entry point for people and CI. `make demo` and `make test` each set up their own
# virtual environment (.venv) on a fresh machine first, with the `train` extra (TensorFlow,
# TFDS: training and dataset building; `make demo` adds `export`, `make test` the test extras);
# `pip install .` alone gives the `jaxtag` commands. `make docs` builds the documentation site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_workdir
PYTHON312 ?= $(HOME)/.pyenv/versions/3.12.1/bin/python
VENV312 ?= .venv312
# jaxtag's own deprecated calls fail the 3.12 job (other packages' deprecations stay warnings).
OWN_DEPRECATIONS := error::DeprecationWarning:(jaxtag|data_prep|configs)(\.|$$)

.PHONY: setup setup-test setup-demo setup-docs setup-py312 demo demo-next docs test test-fast test-py312 lint format bench clean-demo readme-figure setup-browser serve-screenshot

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train]'
	touch $@

# The demo's: `train` and `export` (`jaxtag export`, and onnxruntime for `--engine auto`).
$(VENV)/.installed-demo: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,export]'
	touch $@ $(VENV)/.installed

# The documentation site's tools (mkdocs.yml); the site reads jaxtag's source, not the package.
$(VENV)/.installed-docs: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

# The test extras with the rest in one pip run (one resolve), also on a fresh machine. `test`
# holds `export`, `serve`, `docs` and `beam` (apache-beam: tests/test_beam_build.py; 19 s more
# on the 2-core machine), so the other stamps hold too.
$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,test]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-demo $(VENV)/.installed-docs

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test
setup-demo: $(VENV)/.installed-demo
setup-docs: $(VENV)/.installed-docs

# The main job on the embedded default: build the synthetic set, train, evaluate on its test split;
# then a held-out clip to try the model on, and what to run next.
demo: setup-demo
	$(PY) -m data_prep.build synthetic_tags --data_dir $(DEMO_DIR)/data
	$(PY) run_train.py --config configs/demo.py --workdir $(DEMO_DIR)/run \
		--config.data_dir $(DEMO_DIR)/data
	$(PY) run_eval.py --checkpoint $(DEMO_DIR)/run --dataset synthetic_tags \
		--data_dir $(DEMO_DIR)/data --split test
	$(MAKE) --no-print-directory demo-next

# The end of `make demo` (also on its own, after it): the example clip and three commands to try.
demo-next: setup-demo
	$(PY) -m data_prep.synth $(DEMO_DIR)/example.wav --seed 7 --index 1
	@echo
	@echo "The demo model is in $(DEMO_DIR)/run (a training workdir: its best step is used)."
	@echo "Try it on the clip above ($(DEMO_DIR)/example.wav, made for it and held out):"
	@echo "  $(VENV)/bin/jaxtag tag $(DEMO_DIR)/example.wav --checkpoint $(DEMO_DIR)/run"
	@echo "  $(VENV)/bin/jaxtag explain $(DEMO_DIR)/example.wav --checkpoint $(DEMO_DIR)/run \\"
	@echo "      --start 2.0 --tags plucked,drums,fast --out $(DEMO_DIR)/explain.png"
	@echo "  $(VENV)/bin/jaxtag serve --checkpoint $(DEMO_DIR)/run    # then open http://127.0.0.1:8000"

# The README's explain figure (docs/explain_demo.png), from the demo model: run `make demo` first.
# A held-out synthetic clip (plucked 2.45-4.77 s, drums 4.96-7.96 s, hi-hat ticks: fast).
readme-figure: setup
	$(PY) -m data_prep.synth $(DEMO_DIR)/example.wav --seed 7 --index 1
	$(VENV)/bin/jaxtag explain $(DEMO_DIR)/example.wav --checkpoint $(DEMO_DIR)/run --start 2.0 \
		--tags plucked,drums,fast --out docs/explain_demo.png

# The documentation site into site/; --strict: a broken link or anchor, a page missing from the
# nav, or a reference that does not resolve fails it (tests/test_docs_site.py builds it too).
docs: setup-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Debian's chromium and chromium-driver for the browser test (tests/test_serve_browser.py), as
# root or through sudo; nothing to do where both are installed.
setup-browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			>/dev/null; }

# The screenshot of `jaxtag serve`'s page in docs/serving.md: the browser test on the demo model
# and the README figure's clip (run `make demo` first).
serve-screenshot: setup-test setup-browser
	$(PY) -m data_prep.synth $(DEMO_DIR)/example.wav --seed 7 --index 1
	JAXTAG_SCREENSHOT=docs/serve_page.png JAXTAG_SCREENSHOT_CHECKPOINT=$(DEMO_DIR)/run \
		JAXTAG_SCREENSHOT_AUDIO=$(DEMO_DIR)/example.wav \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_serve_browser.py

# Every test, on TEST_WORKERS processes (pytest-xdist; tests/conftest.py keeps each module on
# one worker); `make test-fast` leaves out the `slow` ones (subprocess and end-to-end runs:
# wheel build, demo, several processes, training runs).
TEST_WORKERS ?= 2
test: setup-test setup-browser lint
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup-test lint
	$(PY) -m pytest -q -m "not slow"

# The torch-free fast tier on Python 3.12 with the newest releases pip resolves (CI's second job).
$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[train,export,openvino,serve,docs]' pytest httpx selenium
	touch $@

setup-py312: $(VENV312)/.installed

test-py312: setup-py312
	$(VENV312)/bin/python -m pytest -q --durations=15 -m "not torch and not slow" -o 'filterwarnings=$(OWN_DEPRECATIONS)'

lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup-test
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-demo:
	rm -rf $(DEMO_DIR)

# sigmalab — the two commands of the README:
#   make demo   set up .venv if needed, then train → sample → evaluate on the embedded digits (CPU, ~10 min)
#   make test   set up .venv if needed, then run the test suite
#   make lint   ruff, and lint-imports (the package layers of pyproject.toml's [tool.importlinter])
# `make setup` alone creates .venv; it is skipped when .venv already holds what pyproject.toml asks for.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp names a hash of pyproject.toml: editing the dependencies re-runs the install, nothing else does.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) train.py run_dir=$(DEMO_DIR) resume=auto
	$(PY) sample.py ckpt=$(DEMO_DIR) seeds=0-99
	$(PY) evaluate.py ckpt=$(DEMO_DIR) eval.baselines=true

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean-demo:
	rm -rf $(DEMO_DIR)

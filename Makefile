# make run   - set up .venv from the requirements (exact versions: requirements-lock.txt) and train all three variants (seeds 0 1 2)
#              (.venv holds the package installed editable, `pip install -e .`: scripts, benchmarks and the `normstudy` command)
# make test  - set up .venv with the test and Ray requirements, lint (ruff) and run the whole test suite
# make lint  - ruff check . (the rules are in pyproject.toml)
# make test-lower - the same at the lowest versions requirements.txt admits (Colab's torch 2.11), in .venv-lower
# make smoke - a short run of the CLI on synthetic data (under a minute on a CPU), into runs/smoke/
# make notebooks-smoke - the three notebooks in smoke mode (one epoch, synthetic data); copies go to runs/notebooks-smoke/
# make lock  - regenerate requirements-lock.txt from a fresh venv (downloads packages, no data)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?= --norm all --seed 0 1 2 --epochs 20 --data-dir ./data
LOCK := requirements-lock.txt
REQUIREMENTS := requirements.txt requirements-dev.txt requirements-ray.txt $(LOCK)
LOWER := requirements-lower.txt
VENV_LOWER ?= .venv-lower
LOCKVENV ?= /tmp/norm-study-lockvenv
NOTEBOOKS := ERA_Session8_Assignment_*_v1.ipynb

.PHONY: run test lint test-lower smoke notebooks notebooks-smoke lock clean

$(VENV)/.installed: $(REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e . -r requirements-dev.txt -r requirements-ray.txt -c $(LOCK)
	touch $@

run: $(VENV)/.installed
	$(PY) train.py $(ARGS)

test: lint
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check .

$(VENV_LOWER)/.installed: requirements.txt requirements-dev.txt requirements-ray.txt $(LOWER) pyproject.toml
	$(PYTHON) -m venv $(VENV_LOWER)
	$(VENV_LOWER)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LOWER)/bin/python -m pip install --quiet -e . -r requirements-dev.txt -r requirements-ray.txt -c $(LOWER)
	touch $@

test-lower: $(VENV_LOWER)/.installed
	$(VENV_LOWER)/bin/python -m pytest -q -p no:cacheprovider

smoke: $(VENV)/.installed
	$(PY) train.py --norm all --smoke --out runs/smoke

notebooks: $(VENV)/.installed
	$(PY) scripts/run_notebooks.py $(NOTEBOOKS)

# The committed notebooks are left alone: executed copies are written under runs/.
notebooks-smoke: $(VENV)/.installed
	$(PY) scripts/run_notebooks.py --smoke $(NOTEBOOKS)

# The header (the lines starting with #) is kept; every pin is rewritten.
lock:
	rm -rf $(LOCKVENV)
	$(PYTHON) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/pip install --quiet -r requirements-dev.txt -r requirements-ray.txt
	{ grep '^#' $(LOCK); $(LOCKVENV)/bin/pip freeze; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) $(VENV_LOWER) .pytest_cache .ruff_cache __pycache__ */__pycache__ *.egg-info

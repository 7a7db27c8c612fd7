# make run   - set up .venv from requirements.txt and train all three variants (seeds 0 1 2)
# make test  - set up .venv with the test requirements and run the whole test suite
# make smoke - a seconds-long run of the CLI on synthetic data
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?= --norm all --seed 0 1 2 --epochs 20 --data-dir ./data --out results

.PHONY: run test smoke notebooks clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) train.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

smoke: $(VENV)/.installed
	$(PY) train.py --norm all --smoke --out /tmp/norm-study-smoke

notebooks: $(VENV)/.installed
	$(PY) scripts/run_notebooks.py ERA_Session8_Assignment_*_v1.ipynb

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ */__pycache__

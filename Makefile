VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: run test bench install clean

run: $(STAMP)
	$(VENV)/bin/securefed run

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

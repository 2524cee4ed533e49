# Set-up and entry points; the README's two commands are `make example` and `make test`.
# constraints-cpu.txt pins the CPU wheel of torch so a CPU machine never pulls a CUDA build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints-cpu.txt -e ".[test]"
	touch $@

.PHONY: install example test
install: $(VENV)/.installed

example: $(VENV)/.installed
	$(PYTHON) examples/train_gradmask.py --quick

test: $(VENV)/.installed
	$(PYTHON) -m pytest

# Set-up and entry points; the README's two commands are `make example` and `make test`.
# torch comes first, alone, from PyTorch's CPU wheel index (constraints-cpu.txt pins
# the +cpu build): PyPI's torch is the CUDA build with several GB of nvidia packages.
# A machine with the wheel in pip's find-links (this project's development machine)
# takes it from there. GPU users: see the README.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-deps --retries 1 --index-url $(TORCH_CPU_INDEX) -c constraints-cpu.txt torch
	$(VENV)/bin/pip install --quiet -c constraints-cpu.txt -e ".[test]"
	touch $@

.PHONY: install example test
install: $(VENV)/.installed

example: $(VENV)/.installed
	$(PYTHON) examples/train_gradmask.py --quick

test: $(VENV)/.installed
	$(PYTHON) -m pytest

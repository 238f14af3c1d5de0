# Set-up and the two jobs the README names. Everything installs into .venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch; a bare "torch" from PyPI would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DOMAIN ?= finance

.PHONY: demo test install clean-venv

# The main job needs memdec and its core engines only; the tests add their extras on top
# (pytest, ruff, gguf, matplotlib, sentence-transformers), so `make demo` sets up faster.
$(VENV)/.core: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.core
	$(VENV)/bin/memdec compare --domain $(DOMAIN)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest -q

clean-venv:
	rm -rf $(VENV)

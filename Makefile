# The two commands of the quickstart: `make demo` and `make test`.
# Both build .venv first (CPU torch pinned; nothing else is needed but python3).
PYTHON ?= python3
VENV := .venv
# CPU build of torch for local runs; cluster images keep their own CUDA torch.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test unit venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(PY) jobs/demo.py

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit layer alone (no Ray, no S3 server): about a minute.
unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

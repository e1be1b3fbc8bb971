# One venv, one install step; `make test` and `make demo` work from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so torch>=2.4 is already met (no CUDA download).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/wsi-pipeline demo --out demo-output

lint: install
	$(VENV)/bin/ruff check wsi_pipeline tests jobs benchmarks

bench: install
	$(PY) benchmarks/tiling.py

clean:
	rm -rf $(VENV) demo-output

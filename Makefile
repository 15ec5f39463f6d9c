# rflow: `make demo` draws a picture, `make test` runs the tests. Both set up $(VENV) first.
#
# The virtual environment is created with python3 -m venv when missing. torch is installed into it only
# when it cannot already be imported, so a CUDA build of torch put into $(VENV) beforehand is kept.

VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
DEMO_PROMPT ?= a large red circle on the left on a white background

PY := $(VENV)/bin/python
STAMP := $(VENV)/.rflow-installed

.PHONY: install demo test clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already in $(VENV): kept"; \
	else \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install -e '.[test]'
	@touch $@

demo: install
	@mkdir -p outputs
	$(VENV)/bin/rflow generate "$(DEMO_PROMPT)" -o outputs/demo.png --force
	@echo "The picture is in $(CURDIR)/outputs/demo.png"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs

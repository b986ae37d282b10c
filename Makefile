# Everything a fresh machine needs: `make demo` and `make test` create .venv and build the shim first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py native/*.h native/*.c native/build_ffi.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	DXL_WERROR=1 $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/pd_link_and_pull.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (lint + format) on everything; mypy --strict on the package (settings in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check dxl tests examples benchmarks native
	$(BIN)/ruff format --check dxl tests examples benchmarks native
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/dxl bench --transport cma tcp --op pull push --block-bytes 4K 16K 64K 256K 1M --passes 3

clean:
	rm -rf $(VENV) build *.egg-info dxl/_dxl_native*.so dxl/_dxl_native.c

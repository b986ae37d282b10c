# Everything a fresh machine needs: `make demo` and `make test` create .venv and build the shim first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test test-fast test-sanitize lint bench clean venv-vllm test-vllm

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

# The tests that start no child process, use no network namespace and run no soak (markers in
# pyproject.toml, tiers in tests/tiers.py): about a minute. DXL_TEST_FAST=1 makes any test that
# starts a child process anyway fail, so an unmarked one cannot hide here. CI runs make test.
FAST_TIER := not multiproc and not netns and not soak and not vllm
test-fast: $(STAMP)
	DXL_TEST_FAST=1 $(BIN)/python -m pytest -q -m "$(FAST_TIER)"

# The native and fuzz tests against the shim built with ASan + UBSan (DXL_SANITIZE=1), in a copy
# of the package under build/sanitize: the normal dxl/_dxl_native*.so stays as it is. CPython
# leaks by design (detect_leaks=0); any other finding aborts the run. Run from that directory
# (python -P: no cwd on sys.path) so the tests and the processes they start import the copy.
SAN_DIR := build/sanitize
SAN_ENV := PYTHONPATH=$(CURDIR)/$(SAN_DIR) LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
test-sanitize: $(STAMP)
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	cp -r dxl $(SAN_DIR)/dxl && rm -f $(SAN_DIR)/dxl/_dxl_native*.so $(SAN_DIR)/dxl/_dxl_native.c
	DXL_WERROR=1 DXL_SANITIZE=1 DXL_NATIVE_TARGET=$(CURDIR)/$(SAN_DIR)/dxl/_dxl_native.abi3.so \
		$(BIN)/python native/build_ffi.py > $(SAN_DIR)/build.log
	cd $(SAN_DIR) && env $(SAN_ENV) $(abspath $(BIN))/python -P -c \
		"import dxl._dxl_native as n; assert n.__file__.startswith('$(CURDIR)/$(SAN_DIR)/'), n.__file__"
	cd $(SAN_DIR) && env $(SAN_ENV) $(abspath $(BIN))/python -P -m pytest -q -p no:cacheprovider --capture=sys \
		--rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(CURDIR)/tests/native $(CURDIR)/tests/test_fuzz.py

# ruff (lint + format) on everything; mypy --strict on the package (settings in pyproject.toml),
# then on tests/ with untyped fixtures and helpers allowed (their bodies are still checked)
MYPY_TESTS := --allow-untyped-defs --allow-untyped-calls --allow-incomplete-defs \
	--allow-any-generics --no-warn-return-any
lint: $(STAMP)
	$(BIN)/ruff check dxl tests examples benchmarks native
	$(BIN)/ruff format --check dxl tests examples benchmarks native
	$(BIN)/mypy
	$(BIN)/mypy $(MYPY_TESTS) tests

# vLLM connector tests in their own environment: vllm==0.33.* with its CUDA torch is several GB
# (~9.5 GB installed), too much for the default venv. dxl is installed into it too (editable).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml setup.py native/*.h native/*.c native/build_ffi.py
	@start=$$(date +%s); \
	(test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)) && \
	$(VLLM_VENV)/bin/pip install -q --upgrade pip && \
	DXL_WERROR=1 $(VLLM_VENV)/bin/pip install -q -e '.[vllm,test]' && \
	echo "$(VLLM_VENV): vllm installed in $$(( $$(date +%s) - start )) s, $$(du -sh $(VLLM_VENV) | cut -f1)"
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	@$(VLLM_VENV)/bin/python -c "import importlib.metadata as m; print('vllm', m.version('vllm'), '/ torch', m.version('torch'))"
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/integrations

bench: $(STAMP)
	$(BIN)/dxl bench --transport cma tcp --op pull push --block-bytes 4K 16K 64K 256K 1M --passes 3

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info dxl/_dxl_native*.so dxl/_dxl_native.c

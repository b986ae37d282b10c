# Everything a fresh machine needs: `make demo` and `make test` create .venv and build the shim first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench clean venv-vllm test-vllm venv-nixl test-nixl bench-nixl

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

# The nixl transport's tests in their own environment: nixl (nixl-cu12/cu13 with bundled UCX)
# requires torch, several GB, too much for the default venv. dxl is installed into it editable,
# as in .venv-vllm; `import dxl` never imports nixl, only the nixl transport does, lazily.
NIXL_VENV := .venv-nixl
NIXL_STAMP := $(NIXL_VENV)/.installed

$(NIXL_STAMP): pyproject.toml setup.py native/*.h native/*.c native/build_ffi.py
	@start=$$(date +%s); \
	(test -x $(NIXL_VENV)/bin/python || $(PY) -m venv $(NIXL_VENV)) && \
	$(NIXL_VENV)/bin/pip install -q --upgrade pip && \
	DXL_WERROR=1 $(NIXL_VENV)/bin/pip install -q -e '.[nixl,test]' && \
	echo "$(NIXL_VENV): nixl installed in $$(( $$(date +%s) - start )) s, $$(du -sh $(NIXL_VENV) | cut -f1)"
	touch $(NIXL_STAMP)

venv-nixl: $(NIXL_STAMP)

# The nixl transport's tests (tests/test_nixl_transport.py: every operation over nixl on host
# memory, failures, deadlines, the idle CPU of a linked pair, printed). UCX logs warnings and
# errors of its own where a test kills or stops a peer; the pytest summary is what counts.
test-nixl: $(NIXL_STAMP)
	@$(NIXL_VENV)/bin/python -c "import importlib.metadata as m; print('nixl', m.version('nixl'), '/ torch', m.version('torch'))"
	@start=$$(date +%s); rc=0; \
	$(NIXL_VENV)/bin/python -m pytest -q -s tests/test_nixl_transport.py tests/test_nixl_selection.py || rc=$$?; \
	echo "test-nixl: the tests took $$(( $$(date +%s) - start )) s"; exit $$rc

# dxl over nixl beside dxl's cma and NIXL used directly (benchmarks/peers/nixl_bench.py), one
# after the other on the same workload (pull, host memory), in .venv-nixl; compare.py's table.
NIXL_BENCH_SIZES ?= 4K 16K 64K 256K 1M
bench-nixl: $(NIXL_STAMP)
	mkdir -p bench-out
	$(NIXL_VENV)/bin/dxl bench --transport nixl cma --op pull --block-bytes $(NIXL_BENCH_SIZES) --passes 3 --json > bench-out/dxl-nixl.jsonl
	$(NIXL_VENV)/bin/python benchmarks/peers/nixl_bench.py --op pull --block-bytes $(NIXL_BENCH_SIZES) --passes 3 --json > bench-out/nixl.jsonl
	$(NIXL_VENV)/bin/python benchmarks/peers/compare.py bench-out/dxl-nixl.jsonl bench-out/nixl.jsonl

bench: $(STAMP)
	$(BIN)/dxl bench --transport cma tcp --op pull push --block-bytes 4K 16K 64K 256K 1M --passes 3

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(NIXL_VENV) build *.egg-info dxl/_dxl_native*.so dxl/_dxl_native.c

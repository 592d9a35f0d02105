# One virtual environment (.venv), filled per need from the lock (requirements/, `make lock`): `make serve` installs
# requirements/serving.txt (the serving extra: no torch); `make test`, `make train` and `make export` install
# requirements/dev.txt (serving + training + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.stamp

MODELS ?= cnn mlp cnn-tiny

.PHONY: serve test lint lock format data train export evaluate bento container loadtest bench bench-versions capacity bench-preprocess ablation bench-read chaos soak container-gpu k8s-validate rollout sysdeps clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A lock is the whole closure, every file hashed: pip resolves nothing (--no-deps) and installs nothing unlisted
# (--require-hashes); `pip check` fails if the lock ever missed a dependency. `bentoml serve` runs from the
# repository root, so serving needs no install of this project; dev installs it (editable) with the lock's own
# setuptools (--no-build-isolation), not with whatever setuptools the index has that day.
LOCK_INSTALL := $(PIP) install -q --require-hashes --no-deps -r

$(STAMP)-serving: requirements/serving.txt | $(BIN)/python
	$(LOCK_INSTALL) requirements/serving.txt
	$(PIP) check -q
	touch $@

$(STAMP)-dev: requirements/dev.txt pyproject.toml | $(BIN)/python
	$(LOCK_INSTALL) requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check -q
	touch $@ $(STAMP)-serving

PORT ?= $(or $(BENTOML_PORT),3000)

serve: $(STAMP)-serving  ## set up and serve the shipped model on http://localhost:3000 (PORT=3001 for another; page at /ui)
	$(BIN)/bentoml serve --port $(PORT)

sysdeps:  ## system packages the tests use (Chromium, Podman, runc, debootstrap, HAProxy, kubectl); needs root
	bash scripts/install-system-deps.sh

lint: $(STAMP)-dev  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Needs PyPI. Keeps every pin pyproject.toml still allows; LOCK_ARGS=--upgrade (or "--upgrade-package numpy")
# takes newer releases. tests/test_lock.py fails until this has run after a dependency edit.
lock: $(STAMP)-dev  ## re-resolve pyproject.toml into the lock, requirements/{serving,dev}.txt (hashes; needs PyPI)
	$(BIN)/python requirements/lock.py $(LOCK_ARGS)

format: $(STAMP)-dev  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: sysdeps $(STAMP)-dev lint  ## set up and run the whole test suite (what CI runs)
	$(BIN)/python -m training data
	$(BIN)/python -m pytest

data: $(STAMP)-dev  ## fetch and verify MNIST into data/mnist
	$(BIN)/python -m training data

ARGS ?=
# Where `make export` writes; exported/ (what `make serve` and the image ship) changes only with REPLACE=1.
EXPORT_DIR ?= runs/export

train: $(STAMP)-dev  ## train the default recipes (MODELS="cnn mlp cnn-tiny") into runs/; ARGS="--epochs 1" adds flags
	for m in $(MODELS); do $(BIN)/python -m training train --model $$m $(ARGS) || exit 1; done

# runs/<model>-<date>-<time>/: "cnn-2*" so that the newest cnn run is never a cnn-tiny one.
export: $(STAMP)-dev  ## export the newest run of each model into runs/export/; REPLACE=1: into exported/, if not worse
	for m in $(MODELS); do \
	  ckpt=$$(ls -td runs/$$m-2*/ 2>/dev/null | head -1)best.pt; \
	  test -f "$$ckpt" || { echo "no run of $$m in runs/: make train first"; exit 1; }; \
	  $(BIN)/python -m training export "$$ckpt" --int8 $(if $(REPLACE),--replace,--out $(EXPORT_DIR)) || exit 1; \
	done

evaluate: $(STAMP)-dev  ## test accuracy of the shipped ONNX files with ONNX Runtime
	for f in exported/*.onnx; do $(BIN)/python -m training evaluate $$f || exit 1; done

URL ?=
USERS ?= 16
DURATION ?= 60
SOAK_DURATION ?= 300

loadtest: $(STAMP)-dev  ## Locust load test, headless; local server unless URL=http://host:3000 (USERS=16 DURATION=60)
	$(BIN)/python -m loadtest.run $(if $(URL),--url $(URL)) --users $(USERS) --time $(DURATION)

soak: $(STAMP)-dev  ## soak run (SOAK_DURATION=300 s, at least 90): zero errors, memory growth after a 30 s warm-up <= 5 %
	$(BIN)/python -m loadtest.run --soak --time $(SOAK_DURATION) $(if $(URL),--url $(URL))

bench: $(STAMP)-dev  ## HTTP benchmark table on this machine (needs wrk: apt-get install -y wrk)
	$(BIN)/python -m benchmarks.bench_service

chaos: $(STAMP)-dev  ## issue 13 under load: memory in a burst of big decodes, 5,000 connections, keep-alive balance (needs wrk)
	$(BIN)/python -m benchmarks.chaos

bench-versions: $(STAMP)-dev  ## a model version loaded, made default and unloaded under load: failures (0), time to every worker
	$(BIN)/python -m benchmarks.live_versions

capacity: $(STAMP)-dev  ## requests per core-second by kind of upload, memory per worker, replicas for 1k/10k/100k req/s
	$(BIN)/python -m benchmarks.capacity

bench-preprocess: $(STAMP)-dev  ## accuracy on realistic uploads, per family: tutorial pipeline, before, ours
	$(BIN)/python benchmarks/preprocess_accuracy.py --model exported/mnist-cnn.onnx --per-family 250

ablation: $(STAMP)-dev  ## each CNN augmentation and outlier exposure off in turn (6 epochs each): test, uploads, drawn shapes
	$(BIN)/python -m benchmarks.ablation $(ARGS)

bench-read: $(STAMP)-dev  ## /read on pages of several digits: whole-string and per-digit accuracy
	$(BIN)/python -m benchmarks.read_accuracy --model exported/mnist-cnn.onnx --pages 200

IMAGE     ?= mnist-service:latest
GPU_IMAGE ?= mnist-service:gpu

rollout: $(STAMP)-dev  ## rolling update of 2 pods behind HAProxy under Locust load: failures, resets, answers per version, ready/drain times (needs haproxy: make sysdeps)
	$(BIN)/python -m benchmarks.rollout

k8s-validate: $(STAMP)-dev  ## render every deploy/k8s overlay; validate it (Kubernetes 1.30 + 1.37 schemas, KServe CRD) and check it against the service
	$(BIN)/python -m pytest -q tests/test_deploy.py

bento: $(STAMP)-serving  ## build the Bento from bentofile.yaml (service code, exported/ models, serving deps)
	$(BIN)/bentoml build

# Docker when its daemon answers, else Podman; BACKEND=docker|podman picks one. The base image is python:3.11-slim
# when the engine can get it, else a Debian base built locally (scripts/container.sh says which).
container: $(STAMP)-serving  ## build the CPU service image $(IMAGE) (Docker or Podman, whichever works here)
	IMAGE=$(IMAGE) BACKEND=$(BACKEND) VENV_BIN=$(BIN) bash scripts/container.sh

container-gpu: container  ## add CUDA/cuDNN to $(IMAGE) as $(GPU_IMAGE) (run with --gpus all)
	engine=$(BACKEND); engine=$${engine:-$$(timeout 20 docker info >/dev/null 2>&1 && echo docker || echo podman)}; \
	$$engine build -f deploy/Containerfile.gpu --build-arg BASE=$(IMAGE) -t $(GPU_IMAGE) deploy

clean:  ## remove the virtual environment and caches (keeps data/ and runs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache

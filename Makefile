# histotransfer: `make demo` runs the study on the embedded sample cohort, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
DEMO_DIR ?= runs/demo
# The images (containers/Dockerfile), named by components/image.py (registry: HISTOTRANSFER_REGISTRY).
IMAGE_CPU = $(shell $(BIN)/python -m components.image cpu)
IMAGE_GPU = $(shell $(BIN)/python -m components.image gpu)
IMAGE_PREDICT = $(shell $(BIN)/python -m components.image predict)
IMAGE_BUILD_ARGS ?=

.PHONY: help setup test test-fast demo lint format bench bench-models clean image image-gpu image-predict push pipeline-compile pipeline-local \
	dvc-repro dvc-remote dvc-yaml docs-layout test-images

setup: $(STAMP)  ## create .venv with the package and its dev extra (the default goal)

# --no-compile: pip would byte-compile every module of every package (16,000 files, a minute); Python
# compiles those that are imported, once, when they first are
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]"
	touch $@

# one pytest worker per core (each pinned to one thread: tests/conftest.py); a test file runs on one
# worker, so its module fixtures (a DVC project, the docker images) are built once
PYTEST := $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

test:  ## lint and the whole test suite, as CI runs it
	@$(MAKE) --no-print-directory test-images & images=$$!; \
	$(MAKE) --no-print-directory lint && $(PYTEST); status=$$?; wait $$images; exit $$status

# The images the docker tests run, built in the background while .venv is made and the other tests run
# (pip and the image build use a core each) when a Docker engine answers. The docker tests' own build
# waits for this one (containers/build.sh takes a lock) and then finds every layer cached. A build
# that fails here is left to those tests to report, with its log.
TEST_IMAGES_LOG ?= $(or $(TMPDIR),/tmp)/histotransfer-test-images.log
test-images:  ## build the images the docker tests run, if a Docker engine answers (make test runs it in the background)
	@if docker info >/dev/null 2>&1; then \
		start=$$(date +%s); status=built; : >$(TEST_IMAGES_LOG); \
		for target in cpu predict; do \
			containers/build.sh $$target "$$(python3 components/image.py $$target)" >>$(TEST_IMAGES_LOG) 2>&1 \
				|| status="not built (the docker tests will build them and report why)"; \
		done; \
		echo "test images $$status in $$(( $$(date +%s) - start )) s (log: $(TEST_IMAGES_LOG))"; \
	fi

test-fast: setup  ## the tests not marked integration, slow or docker
	$(PYTEST) -m "not integration and not slow and not docker"

demo: setup  ## the study on the embedded sample cohort, into DEMO_DIR (runs/demo)
	$(BIN)/histotransfer run --output-dir $(DEMO_DIR)

lint: setup  ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup  ## the benchmarks (numbers and sizing: benchmarks/README.md)
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_extract.py --encoder efficientnet_lite0 --encoder resnet50@layer3+random \
		--encoder resnet18+random
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_onnx.py
	$(BIN)/python benchmarks/bench_cka.py
	$(BIN)/python benchmarks/bench_models.py --model lunit_vits8 --model phikon --model conch --seconds 3

bench-models: setup  ## every foundation model's speed (about 12 minutes on 2 cores)
	$(BIN)/python benchmarks/bench_models.py

# IMAGE_BUILD_ARGS: options for docker build, e.g. --build-arg PIP_INDEX_URL=... for an internal mirror
image:  ## build the cpu image (needs a Docker engine)
	containers/build.sh cpu $(IMAGE_CPU) $(IMAGE_BUILD_ARGS)

image-gpu:  ## build the gpu image, the one the pipelines use
	containers/build.sh gpu $(IMAGE_GPU) $(IMAGE_BUILD_ARGS)

image-predict:  ## build the slim predict image (no torch)
	containers/build.sh predict $(IMAGE_PREDICT) $(IMAGE_BUILD_ARGS)

push: image image-gpu image-predict  ## build and push the three images to REGISTRY (make push REGISTRY=ghcr.io/you)
	docker push $(IMAGE_CPU)
	docker push $(IMAGE_GPU)
	docker push $(IMAGE_PREDICT)

pipeline-compile: setup  ## rewrite pipelines/*.yaml (KFP)
	$(BIN)/histotransfer pipeline compile

pipeline-local: setup  ## run the KFP study pipeline here, without a cluster
	$(BIN)/histotransfer pipeline run-local --config params.yaml --pipeline-root runs/kfp-local

dvc-yaml: setup  ## regenerate dvc.yaml and params.yaml (pipelines/dvc_stages.py; a test fails when stale)
	$(BIN)/python -m pipelines.dvc_stages .

docs-layout: setup  ## regenerate the layout tree in docs/outputs.md from histotransfer/io/layout.py
	$(BIN)/python -m pipelines.docs_layout

dvc-repro: setup  ## dvc repro: the study under study/
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# A local DVC remote for the demo (outside the repository; recorded in .dvc/config.local, not committed).
DVC_REMOTE ?= $(HOME)/.cache/histotransfer/dvc-remote
dvc-remote: setup  ## a local DVC remote for the demo
	mkdir -p $(DVC_REMOTE)
	$(BIN)/dvc remote add --local --default --force demo $(DVC_REMOTE)
	@echo "remote 'demo' -> $(DVC_REMOTE): dvc push / dvc pull"

clean:  ## remove DEMO_DIR and the tool caches
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache

# `make help`: every target with the `## ` description on its line. `make` alone still runs setup.
help:  ## list the targets with one line each
	@awk -F':.*## ' '/^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

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

.PHONY: setup test test-fast demo lint format bench bench-models clean image image-gpu image-predict push pipeline-compile pipeline-local \
	dvc-repro dvc-remote dvc-yaml

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

test: setup lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not docker"

demo: setup
	$(BIN)/histotransfer run --config params.yaml --output-dir $(DEMO_DIR)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_extract.py --encoder efficientnet_lite0 --encoder resnet50@layer3+random \
		--encoder resnet18+random
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_onnx.py
	$(BIN)/python benchmarks/bench_cka.py
	$(BIN)/python benchmarks/bench_models.py --model lunit_vits8 --model phikon --model conch --seconds 3

bench-models: setup  # every foundation model (about 12 minutes on 2 cores)
	$(BIN)/python benchmarks/bench_models.py

# IMAGE_BUILD_ARGS: options for docker build, e.g. --build-arg PIP_INDEX_URL=... for an internal mirror
image:
	containers/build.sh cpu $(IMAGE_CPU) $(IMAGE_BUILD_ARGS)

image-gpu:
	containers/build.sh gpu $(IMAGE_GPU) $(IMAGE_BUILD_ARGS)

image-predict:
	containers/build.sh predict $(IMAGE_PREDICT) $(IMAGE_BUILD_ARGS)

push: image image-gpu image-predict
	docker push $(IMAGE_CPU)
	docker push $(IMAGE_GPU)
	docker push $(IMAGE_PREDICT)

pipeline-compile: setup
	$(BIN)/histotransfer pipeline compile

pipeline-local: setup
	$(BIN)/histotransfer pipeline run-local --config params.yaml --pipeline-root runs/kfp-local

dvc-yaml: setup  # dvc.yaml from the stage list (pipelines/dvc_stages.py); a test fails when it is stale
	$(BIN)/python -m pipelines.dvc_stages dvc.yaml

dvc-repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# A local DVC remote for the demo (outside the repository; recorded in .dvc/config.local, not committed).
DVC_REMOTE ?= $(HOME)/.cache/histotransfer/dvc-remote
dvc-remote: setup
	mkdir -p $(DVC_REMOTE)
	$(BIN)/dvc remote add --local --default --force demo $(DVC_REMOTE)
	@echo "remote 'demo' -> $(DVC_REMOTE): dvc push / dvc pull"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache

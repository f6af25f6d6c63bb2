#!/usr/bin/env bash
# promote.yml: gates, then the two-step promotion on every replica of $NAMESPACE (each pod through
# its own port-forward), publishing models.config to the ConfigMap the pods poll and the
# versions to gs://$BUCKET/$ENV_NAME, which the pods read. Extra arguments: the approval.
set -euo pipefail
canary=()
if [ "$LABEL" = canary ]; then canary=(--canary); fi
exec .venv/bin/python -m serving.promote "$MODEL" "$VERSION" --from candidates --to store \
  --set artifacts=runs "${canary[@]}" \
  --serving-base-path "gs://$BUCKET/$ENV_NAME" \
  --sync-cmd "gcloud storage rsync -r --delete-unmatched-destination-objects store gs://$BUCKET/$ENV_NAME" \
  --kube-configmap "$NAMESPACE/tfserving-config" --servers-poll \
  --server "kube:$NAMESPACE/tfserving-replicas:8500" "$@"

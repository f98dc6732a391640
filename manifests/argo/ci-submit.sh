#!/usr/bin/env bash
# Example CI trigger: submit one run from the WorkflowTemplate and stream it until it ends.
# Needs: argo CLI, a kubeconfig for the namespace, `kubectl apply -f manifests/argo/sftjob-workflowtemplate.yaml` once.
set -euo pipefail
NS=${NS:-ml}
RUN=${RUN:-sft-$(git rev-parse --short HEAD)}
argo submit -n "$NS" --from workflowtemplate/sftjob \
  --generate-name "$RUN-" \
  -p name="$RUN" \
  -p data="s3://datasets/support/train.jsonl" \
  -p model="s3://models/Qwen2.5-0.5B-Instruct/" \
  -p output="s3://runs/$RUN/" \
  -p run-spec='{"train": {"learning_rate": 0.0001, "max_steps": 500}, "resilience": {"save_minutes": 20}}' \
  -p nodes=2 -p gpus-per-node=8 \
  --wait --log

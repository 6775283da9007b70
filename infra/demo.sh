#!/usr/bin/env bash
# `make demo`: the local stack (Prefect server on SQLite, a process worker, MLflow), every deployment
# of prefect.yaml, then train-sat/demo run through Prefect and watched to its end, then the scores.
# The stack stays up afterwards so the UIs can be browsed; stop it with `.venv/bin/captioning stack down`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
STATE="${STACK_DIR:-demo-data/stack}"
export PATH="$PWD/$BIN:$PATH"   # the worker's flow runs and torchrun use this venv

captioning stack up --state-dir "$STATE"
eval "$(captioning stack env --state-dir "$STATE")"
export CAPTIONING_HOME="$PWD"   # prefect.yaml's pull step: flow runs start in this checkout
prefect --no-prompt deploy --all >"$STATE/logs/deploy.log" 2>&1 || { tail -30 "$STATE/logs/deploy.log"; exit 1; }
echo "deployed: $(grep -c 'Deployment .* successfully created' "$STATE/logs/deploy.log" || true) deployments (log: $STATE/logs/deploy.log)"

# DEMO_PARAMS: extra `prefect deployment run` options, e.g. -p 'overrides=["train.xe.epochs=1"]'
# shellcheck disable=SC2086
prefect deployment run train-sat/demo --watch ${DEMO_PARAMS:-}

cat <<EOT

Where to look:
  Prefect UI  $(echo "$PREFECT_API_URL" | sed 's#/api$##')   (flow runs, task logs incl. every torchrun line)
  MLflow UI   $MLFLOW_TRACKING_URI   (experiment show-attend-tell: parent run, one child per stage, models)
  outputs     demo-data/runs/demo/<flow run name>/   shards: demo-data/shards/
  stop        $BIN/captioning stack down --state-dir $STATE

EOT
python -m captioning.tracking.report

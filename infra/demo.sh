#!/usr/bin/env bash
# `make demo`: the local stack (Prefect server on SQLite, a process worker, MLflow), every deployment
# of prefect.yaml, then train-sat/demo run through Prefect and followed to its end, then the scores.
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

# Start train-sat/demo and print its log lines as they come (flows/follow.py): each stage's start,
# every epoch's loss, validation scores and ETA, the test scores. Every line of the run's processes
# (and the worker's own) is also in the worker's log.
echo "worker log: $STATE/logs/worker.log"
# DEMO_PARAMS: extra parameters as `prefect deployment run` takes them, e.g. -p 'overrides=["train.xe.epochs=1"]'
rc=0
# shellcheck disable=SC2086
python -m flows.follow train-sat/demo ${DEMO_PARAMS:-} || rc=$?

cat <<EOT

Where to look:
  Prefect UI  $(echo "$PREFECT_API_URL" | sed 's#/api$##')   (flow runs, task logs incl. every torchrun line)
  worker log  $STATE/logs/worker.log
  MLflow UI   $MLFLOW_TRACKING_URI/#/experiments?workflowType=machine_learning   (training runs of show-attend-tell:
              the parent run, one child per stage; models; the run's own link is printed below)
  outputs     demo-data/runs/demo/<flow run name>/   shards: demo-data/shards/
  stop        $BIN/captioning stack down --state-dir $STATE

EOT
[ "$rc" = 0 ] || { echo "the demo run did not complete (exit $rc): its lines are above and in the worker log" >&2; exit "$rc"; }
python -m captioning.tracking.report

#!/usr/bin/env bash
# Reproduce the shipped Shapes numbers and the published leaderboard records.
#   bash scripts/publish_shapes.sh [methods...]      (default: the reference rows noop, retrain)
# Writes bench/world/assets/shapes/report/{check.json,grid-*.png,throughput.json},
# runs/perf/perf.json, runs/shapes/<concept>/<method>/…/record.json, then copies the records
# into leaderboard/results/ and rebuilds the leaderboard.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
METHODS=${*:-noop retrain}
for m in $METHODS; do
  for c in star stripes red; do
    $PY -m bench method=$m concept=$c eval=quick
  done
done
mkdir -p leaderboard/results
for rec in runs/shapes/*/*/*/record.json; do
  dest=leaderboard/results/$(dirname "${rec#runs/}")
  mkdir -p "$dest"
  cp "$(dirname "$rec")"/{record.json,*.png} "$dest"/ 2>/dev/null || true
done
$PY -m leaderboard build

#!/usr/bin/env bash
# Run and publish the Shapes board: every given method on every given concept and seed, at eval=quick
# with the given probes (default probes=all), then copy the finished runs into leaderboard/results/ and rebuild the site.
#   bash scripts/publish_shapes.sh [methods...]          (default: the reference rows noop retrain)
#   CONCEPTS="star stripes red" SEEDS="0 1 2" PROBES="[partial_diffusion,inversion]" bash scripts/publish_shapes.sh esd_x uce
# Each job is `python -m bench method=<m> concept=<c> seed=<s> probes=<PROBES> eval=quick` (finished
# stages are reused; adding a probe recomputes nothing else). Gold-standard rows run first, so every
# method's record names its gold. Images are published for seed 0 only (the page shows that seed's;
# the other seeds' records carry the numbers). Timings are only comparable with one job on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
METHODS=${*:-noop retrain}
CONCEPTS=${CONCEPTS:-star stripes red}
SEEDS=${SEEDS:-0 1 2}
PROBES=${PROBES:-all}
LOG=${LOG:-runs/publish.log}
mkdir -p "$(dirname "$LOG")"
dirs=()
ordered=$(for m in $METHODS; do [ "$m" = retrain ] && echo "$m"; done; for m in $METHODS; do [ "$m" != retrain ] && echo "$m"; done)
for m in $ordered; do
  for c in $CONCEPTS; do
    for s in $SEEDS; do
      echo "== $(date +%T) $m $c seed $s" | tee -a "$LOG"
      out=$($PY -m bench method="$m" concept="$c" seed="$s" eval=quick "probes=$PROBES" 2>>"$LOG")
      echo "$out" >> "$LOG"
      rec=$(echo "$out" | sed -n 's/^  record:  //p' | tail -1)
      dirs+=("$(dirname "$rec")")
    done
  done
done
$PY -m leaderboard publish "${dirs[@]}"

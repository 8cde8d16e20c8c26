#!/usr/bin/env bash
# Speed-up of the local parallel launcher over the sequential one, on the same sweep, each from an
# empty cache (so both pay for λ_O and the θ-prefix snapshots once):
#   bash scripts/bench_sweep.sh [METHOD] [CONCEPT]        (default: uce star, eval=quick)
# Writes sweep reports under multirun/bench-<method>-{parallel,sequential}/ and prints wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-uce}
CONCEPT=${2:-star}
ROOT=${BENCH_SWEEP_DIR:-multirun/bench-$METHOD-$CONCEPT}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
rm -rf "$ROOT"
run() {  # name, extra make args
  local name=$1; shift
  local t0=$(date +%s.%N)
  make sweep METHOD="$METHOD" CONCEPT="$CONCEPT" SWEEP_DIR="$ROOT/$name/sweep" \
    ARGS="out_dir=$ROOT/$name/runs cache_dir=$ROOT/$name/cache" "$@" > "$ROOT/$name.log" 2>&1
  local t1=$(date +%s.%N)
  python3 - "$ROOT" "$name" "$t0" "$t1" <<'PY'
import json, pathlib, sys
root, name, t0, t1 = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
jobs = [json.loads(p.read_text())["status"] for p in sorted((root / name / "sweep").glob("*/result.json"))]
(root / f"{name}.seconds").write_text(f"{t1 - t0:.1f}")
print(f"{name}: {t1 - t0:.0f} s wall, {jobs.count('ok')}/{len(jobs)} jobs ok")
PY
}
mkdir -p "$ROOT"
run parallel LAUNCHER=local
run sequential
python3 - "$ROOT" <<'PY'
import sys, pathlib
root = pathlib.Path(sys.argv[1])
p, s = (float((root / f"{n}.seconds").read_text()) for n in ("parallel", "sequential"))
print(f"speed-up (sequential / parallel, 2 workers): x{s / p:.2f}")
PY

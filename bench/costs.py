"""``python -m bench.costs`` (``make costs``): what a job's probes cost, priced from the config alone.

Each probe counts the UNet rows it will spend (``Probe.rows``; the tests hold every count to the
NFE counter of a real run), so a probe suite can be priced on a model that is not loaded here:

    python -m bench.costs model=sd14 concept=van_gogh probes=all            # SD v1.4, one method row
    python -m bench.costs model=sd14 concept=van_gogh probes=all --smoke runs/gpu_smoke.json
    python -m bench.costs concept=star probes=all                           # the Shapes world

Rows are priced at one per-row cost: ``--row-ms`` (default 12 ms, an assumed SD v1.x 512² fp16
batched figure for an A100/RTX 4090-class GPU), or the per-row cost that ``make gpu-smoke --json``
measured on the machine at hand (``--smoke``: its "attack (θ* continuations)" stage). A training
row (forward + backward, counted 2 by the NFE counter) is priced as three forward rows. The
estimate leaves out VAE decoding, detectors, the classifier and the method's own unlearning
(``make gpu-smoke`` prices those); ``theta`` rows (θ's ψ-prefixes and context images) are shared
by every method row of a (model, concept) and are listed apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSUMED_ROW_MS = 12.0
TRAIN_ROW_FACTOR = 1.5  # per counted NFE of a training row: forward + backward ≈ 3 forward rows, counted 2


def workload(cfg: Any, concept: Any):
    from bench.probes import Workload

    e = cfg.eval
    forget = len(list(concept.forget_prompts)[: e.max_forget_prompts or None])
    retain = len(list(concept.retain_prompts)[: e.max_retain_prompts or None])
    renders = concept.render is not None or bool(getattr(concept, "images_dir", None))
    return Workload(forget=forget, retain=retain, steps=int(e.steps), targets=max(1, len(concept.targets or ())),
                    cfg=float(e.guidance) > 1, renders=renders)


def plan(cfg: Any) -> dict[str, Any]:
    """Row counts per probe and for the job's own λ_O/λ_U images, from a composed config."""
    from bench.config import check_probes
    from bench.worlds import build_concept

    concept = build_concept(cfg)
    probes = check_probes(cfg, concept)
    w = workload(cfg, concept)
    n_ref = max(int(cfg.eval.n), int(cfg.eval.detect_n))
    job = {"sample": w.sample((w.forget + w.retain) * n_ref), "train": 0, "theta": w.sample((w.forget + w.retain) * n_ref)}
    return {"workload": w.__dict__, "job (λ_U; λ_O is θ's)": job, "probes": {p.name: p.rows(w) for p in probes}}


def price(rows: dict[str, int], row_s: float) -> float:
    return (rows["sample"] + rows["theta"] + TRAIN_ROW_FACTOR * rows["train"]) * row_s


def row_cost(args: argparse.Namespace) -> tuple[float, str]:
    if args.smoke:
        data = json.loads(Path(args.smoke).read_text())
        per = {r["stage"]: r.get("per_unit") for r in data.get("rows", data.get("stages", []))}
        cost = per.get("attack (θ* continuations)") or per.get("generate λ_U (θ*)")
        if not cost:
            raise SystemExit(f"error: {args.smoke} has no per-row sampling cost (run `make gpu-smoke ARGS=\"--json {args.smoke}\"`)")
        return float(cost), f"measured by make gpu-smoke ({args.smoke}, device {data.get('device', '?')})"
    return args.row_ms / 1000, f"assumed {args.row_ms:g} ms per UNet row (not measured here; --smoke uses a gpu-smoke measurement)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m bench (model=sd14 probes=all …)")
    ap.add_argument("--row-ms", type=float, default=ASSUMED_ROW_MS, help="seconds per UNet row × 1000 when --smoke is not given")
    ap.add_argument("--smoke", default=None, help="a make gpu-smoke --json file: take the per-row cost it measured")
    ap.add_argument("--json", default=None, help="also write the plan and prices to this file")
    args = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from bench.hparams import ConfigError

    try:
        with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
            cfg = compose("config", overrides=args.overrides)
        p = plan(cfg)
    except (ConfigError, HydraException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    row_s, source = row_cost(args)
    print(f"{cfg.model.name} · {cfg.concept.name} · eval={cfg.eval.name} · {p['workload']['forget']} forget / "
          f"{p['workload']['retain']} retain prompts · {p['workload']['steps']} steps · {source}")
    print(f"{'':<26}{'θ* rows':>12}{'train NFE':>12}{'θ rows':>12}{'minutes':>10}")
    total = 0.0
    for name, rows in [("job (λ_U; λ_O is θ's)", p["job (λ_U; λ_O is θ's)"]), *p["probes"].items()]:
        s = price(rows, row_s)
        total += s if name in p["probes"] else 0.0
        p.setdefault("seconds", {})[name] = s
        print(f"{name:<26}{rows['sample']:>12,}{rows['train']:>12,}{rows['theta']:>12,}{s / 60:>10.1f}")
    print(f"{'probes, total':<26}{'':>36}{total / 60:>10.1f}   ({total / 3600:.2f} h per method row; θ rows are shared by the rows of a concept)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**p, "row_seconds": row_s, "row_source": source, "probe_seconds_total": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

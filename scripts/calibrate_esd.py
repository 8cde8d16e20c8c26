"""Calibrate ESD's Shapes-world defaults (ESD-x and ESD-u): a small sweep over the method's knobs.

Run (2 CPU cores; see docs/calibration/esd.md for the measured duration):
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_esd.py --out docs/calibration/esd.md

For each variant (esd-x, esd-u), each configuration in ``GRID`` and each concept preset (star,
stripes, red) ESD fine-tunes the shipped Shapes pipeline once for the configuration's largest
iteration count, and the UNet is snapshotted at every count in ``ITERATIONS`` on the way. With a
constant learning rate and one draw of the torch RNG sequence per iteration, the snapshot after k
iterations is bit-identical to a run with ``iterations=k`` (checked by ``--check``), so one run
serves every count. Every snapshot is scored with the world's oracle detector:
- ``detect_u``: on the concept's canonical forget prompt (its first), the share of ``--seeds``
  images whose detector argmax is the concept value (target ≤ 0.20);
- ``retention``: on each retain prompt, the mean detection rate of the factors the prompt names,
  over the base model's, averaged over the retain prompts (target ≥ 0.80; the minimum is shown),
  with ``--retain-seeds`` images per prompt.
Per variant, the chosen configuration is the passing one (both targets on every concept) with the
highest mean retention, ties to fewer iterations; failing that, the best trade-off: most concepts
passing, then keeping the retention target on every concept, then the lowest mean ``detect_u``. The chosen configuration is re-run as a plain ``unlearn``
call to time it and scored on every forget prompt (paraphrases included).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import calibration_common as cal
import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ("star", "stripes", "red")
VARIANTS = ("esd-x", "esd-u")
# Knobs fixed for the Shapes world (see conf/method_model/esd_*_shapes.yaml for why): the world's
# own 20-step DDIM grid for x_t. Everything else starts from the paper's SD defaults.
FIXED = {"ddim_steps": 20}
GRID: list[dict] = [
    {"lr": 1e-5},  # 0: the paper's lr (with the paper's η = 1)
    {"lr": 1e-4},  # 1
    {"lr": 3e-4},  # 2
    {"lr": 1e-3},  # 3
    {"lr": 1e-3, "negative_guidance": 3.0},  # 4: η = 3 is the paper's ESD-x-3 / ESD-u-3
    {"lr": 1e-4, "negative_guidance": 3.0},  # 5
    {"lr": 3e-4, "negative_guidance": 3.0},  # 6
]
ITERATIONS = (250, 500, 1000)


def _train_with_snapshots(pipe, concept, params: dict, at: tuple[int, ...]) -> tuple[dict, dict[int, dict]]:
    """One ``unlearn`` run of max(at) iterations; the UNet state after each k in ``at``."""
    import methods.esd as esd

    snaps: dict[int, dict] = {}
    real_tqdm = esd.tqdm

    class TqdmWithSnapshots(real_tqdm):
        def __iter__(self):
            for i in super().__iter__():
                if i in at:  # i iterations are done when the loop asks for iteration i
                    snaps[i] = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
                yield i

    esd.tqdm = TqdmWithSnapshots
    try:
        report = esd.unlearn(pipe, concept, **params, iterations=max(at))
    finally:
        esd.tqdm = real_tqdm
    snaps[max(at)] = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    return report, snaps


def _check_snapshots() -> None:
    """A snapshot after k iterations equals a run with iterations=k (tiny pipeline, bitwise)."""
    from bench.concepts import Concept
    from bench.testing import tiny_sd_pipeline
    from methods.esd import unlearn

    c = Concept(name="star", kind="object", target="star", forget_prompts=("a star",), retain_prompts=("a circle",))
    params = {"ddim_steps": 5, "lr": 1e-3, "variant": "esd-u"}
    pipe = tiny_sd_pipeline(text_len=16)
    torch.manual_seed(0)
    _, snaps = _train_with_snapshots(pipe, c, params, (3, 7))
    for k in (3, 7):
        ref = tiny_sd_pipeline(text_len=16)
        torch.manual_seed(0)
        unlearn(ref, c, **params, iterations=k)
        same = all(torch.equal(v, snaps[k][n]) for n, v in ref.unet.state_dict().items())
        print(f"snapshot after {k} iterations == run with iterations={k}: {same}")
        if not same:
            raise SystemExit("snapshots are not equivalent to separate runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=str(ROOT / "bench/world/assets/shapes"))
    ap.add_argument("--seeds", type=int, default=64, help="seeds for detect_u on the canonical forget prompt")
    ap.add_argument("--retain-seeds", type=int, default=16, help="seeds per retain prompt")
    ap.add_argument("--para-seeds", type=int, default=32, help="seeds per forget prompt for the chosen configs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--grid", type=int, nargs="+", default=None, help="indices into GRID (default: all)")
    ap.add_argument("--iterations", type=int, nargs="+", default=list(ITERATIONS))
    ap.add_argument("--final-threads", type=int, default=2, help="torch threads for the timed plain run of each chosen config")
    ap.add_argument("--no-final", action="store_true", help="skip the timed run and the paraphrase scores")
    ap.add_argument("--check", action="store_true", help="only verify snapshot == separate run, then exit")
    ap.add_argument("--merge", nargs="+", default=None, help="write the table from --json dumps of parallel runs")
    ap.add_argument("--out", default=str(ROOT / "docs/calibration/esd.md"))
    ap.add_argument("--json", default=None, help="also dump the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        _check_snapshots()
        return
    if args.merge:
        dumps = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {
            "results": [r for d in dumps for r in d["results"]],
            "finals": {k: v for d in dumps for k, v in d["finals"].items()},
            "base": dumps[0]["base"],
            "minutes": max(d["minutes"] for d in dumps),
            "args": dumps[0]["args"],
        }
        _write(argparse.Namespace(**{**merged["args"], "out": args.out}), merged)
        return

    from bench.concepts import concept_from_cfg

    pipe, detector = cal.load(args.world)
    seeds, retain_seeds = list(range(args.seeds)), list(range(args.retain_seeds))
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    concepts = {c: concept_from_cfg(OmegaConf.load(ROOT / f"conf/concept/{c}.yaml")) for c in args.concepts}
    grid = [GRID[i] for i in args.grid] if args.grid else GRID
    at = tuple(sorted(args.iterations))

    t0 = time.perf_counter()
    base = {}
    for name, c in concepts.items():
        base[name] = cal.measure(pipe, c, detector, seeds, retain_seeds)
        print(name, "base", json.dumps(base[name]), flush=True)

    results, states = [], {}  # one row per (variant, cfg, iterations); states[(row index, concept)]
    for variant in args.variants:
        for cfg in grid:
            rows = {k: {"variant": variant, "cfg": {**cfg, "iterations": k}, "concepts": {}} for k in at}
            train_s = []
            for name, c in concepts.items():
                pipe.unet.load_state_dict(original)
                torch.manual_seed(0)
                t, c0 = time.perf_counter(), time.process_time()
                report, snaps = _train_with_snapshots(pipe, c, {**FIXED, **cfg, "variant": variant}, at)
                train_s.append((time.perf_counter() - t, time.process_time() - c0, report["nfe"]))
                for k, state in snaps.items():
                    pipe.unet.load_state_dict(state)
                    rows[k]["concepts"][name] = cal.row(base[name], cal.measure(pipe, c, detector, seeds, retain_seeds), c)
                    states[(len(results) + at.index(k), name)] = state
            for row in rows.values():
                row["n_pass"] = sum(cal.passes(r) for r in row["concepts"].values())
                row["score"] = float(np.mean([1 - r["detect_u"] / max(r["detect_o"], 1e-9) + r["retention"] for r in row["concepts"].values()]))
                row["train_s_per_iter"] = float(np.mean([w for w, _, _ in train_s]) / max(at))
                row["cpu_s_per_iter"] = float(np.mean([p for _, p, _ in train_s]) / max(at))
                row["nfe_per_iter"] = float(np.mean([n for _, _, n in train_s]) / max(at))
                results.append(row)
                print(variant, cal.describe(row["cfg"]), json.dumps(row["concepts"]), flush=True)

    finals = {}
    if not args.no_final:
        for variant, i in _choose(results).items():
            finals[variant] = _final(pipe, original, concepts, detector, args, {**FIXED, **results[i]["cfg"], "variant": variant},
                                     {name: states[(i, name)] for name in concepts})
    raw = {"results": results, "finals": finals, "base": base, "minutes": (time.perf_counter() - t0) / 60,
           "args": {k: v for k, v in vars(args).items() if k not in ("merge", "json", "out")}}
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    _write(args, raw)


def _choose(results: list[dict]) -> dict[str, int]:
    """Per variant, the index of the chosen row (module docstring)."""
    chosen = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        mine = [i for i, r in enumerate(results) if r["variant"] == variant]
        full = [i for i in mine if results[i]["n_pass"] == len(results[i]["concepts"])]
        if full:
            chosen[variant] = max(full, key=lambda i: (np.mean([v["retention"] for v in results[i]["concepts"].values()]), -results[i]["cfg"]["iterations"]))
        else:
            chosen[variant] = max(mine, key=lambda i: (
                results[i]["n_pass"],
                all(v["retention"] >= 0.80 for v in results[i]["concepts"].values()),
                -np.mean([v["detect_u"] for v in results[i]["concepts"].values()]),
            ))
    return chosen


def _final(pipe, original, concepts, detector, args, params, states) -> dict:
    """Detection on every forget prompt for the chosen snapshots; wall time of a plain run."""
    from methods.esd import unlearn

    seeds, out = list(range(args.para_seeds)), {"forget": {}}
    for name, c in concepts.items():
        pipe.unet.load_state_dict(states[name])
        out["forget"][name] = cal.forget_rates(pipe, c, detector, seeds)
    name, c = next(iter(concepts.items()))
    pipe.unet.load_state_dict(original)
    torch.set_num_threads(args.final_threads)
    torch.manual_seed(0)
    t, c0 = time.perf_counter(), time.process_time()
    report = unlearn(pipe, c, **params)
    out["timed"] = {"concept": name, "threads": args.final_threads, "wall_s": time.perf_counter() - t,
                    "cpu_s": time.process_time() - c0, "nfe": report["nfe"], "nfe_sampling": report["nfe_sampling"]}
    torch.set_num_threads(args.threads)
    pipe.unet.load_state_dict(original)
    print("final", params["variant"], json.dumps(out), flush=True)
    return out


def _write(args, raw: dict) -> None:
    results, finals, base = raw["results"], raw["finals"], raw["base"]
    chosen = _choose(results)
    names = list(base)
    lines = [
        "# ESD — Shapes-world calibration",
        "",
        "Command (2 CPU cores, `torch.set_num_threads(1)` for the sweep):",
        "",
        "    HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_esd.py --out docs/calibration/esd.md",
        "",
        f"Targets: on each concept's canonical forget prompt, concept detection `detect_u` ≤ 0.20 "
        f"({args.seeds} seeds, DDIM 20 steps, guidance 7.5); retain prompts keep ≥ 80% of the base "
        f"model's fidelity (`ret` = mean over retain prompts of fidelity(θ*)/fidelity(θ), {args.retain_seeds} "
        "seeds each; `min` = the worst retain prompt). Every run fine-tunes the shipped base model with "
        f"seed 0. Fixed for the world: {cal.describe(FIXED)}; unlisted knobs are the paper's SD defaults "
        "(η = 1, start_guidance 3, batch 1, x_t from the trained model, aligned timestep rule). Rows with "
        "several iteration counts come from one run snapshotted on the way (bit-identical to separate "
        "runs: `--check`). s/iter = wall seconds per training iteration at 1 thread (CPU seconds in brackets).",
        "",
        "| variant | config | " + " | ".join(f"{c}: det_o → det_u, ret (min)" for c in names) + " | pass | s/iter (cpu) | NFE/iter |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for i, r in enumerate(results):
        cells = [f"{v['detect_o']:.2f} → {v['detect_u']:.2f}, {v['retention']:.2f} ({v['retention_min']:.2f})" for v in r["concepts"].values()]
        mark = " **(chosen)**" if chosen.get(r["variant"]) == i else ""
        lines.append(
            f"| {r['variant']} | {cal.describe(r['cfg'])}{mark} | " + " | ".join(cells)
            + f" | {r['n_pass']}/{len(names)} | {r['train_s_per_iter']:.3f} ({r['cpu_s_per_iter']:.3f}) | {r['nfe_per_iter']:.1f} |"
        )
    lines += [""]
    for variant, i in chosen.items():
        row = results[i]
        ok = "meets both targets on every concept" if row["n_pass"] == len(names) else f"best trade-off ({row['n_pass']}/{len(names)} concepts pass)"
        lines.append(f"Chosen for {variant}: `{cal.describe({**FIXED, **row['cfg']})}` — {ok}.")
    for variant, f in finals.items():
        tm = f["timed"]
        lines += [
            "",
            f"{variant}, chosen configuration: concept detection on every forget prompt ({args.para_seeds} seeds):",
            "",
        ]
        lines += [f"- {name}: " + "; ".join(f"\"{p}\" {v:.2f}" for p, v in rates.items()) for name, rates in f["forget"].items()]
        lines += ["", f"Timed plain `unlearn` call ({tm['concept']}, {tm['threads']} threads): {tm['wall_s']:.0f} s wall, "
                  f"{tm['cpu_s']:.0f} s CPU, NFE {tm['nfe']} ({tm['nfe_sampling']} in the x_t sampler)."]
    lines += ["", f"Whole sweep: {raw['minutes']:.1f} min.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

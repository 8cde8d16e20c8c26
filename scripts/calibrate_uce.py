"""Calibrate UCE's Shapes-world defaults: a small staged sweep over the method's own knobs.

Run (≈2300 images of 32×32, DDIM 20 steps; ≈7 min on 2 idle CPU cores, 40+ min when shared):
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_uce.py --out docs/calibration/uce.md --json /tmp/uce_calibration.json

Targets, per concept preset (star, stripes, red), measured with the world's oracle detector:
- ``detect_u``: on the concept's canonical forget prompt (its first), the share of ``--seeds``
  images whose detector argmax is the concept value — at most 0.20;
- ``retention``: on each retain prompt, the mean detection rate of the factors the prompt names,
  over the base model's, averaged over the retain prompts — at least 0.80 (the minimum is shown).
Stage 1 screens every configuration in ``GRID`` on the canonical forget prompts with a few seeds;
stage 2 measures the finalists (the screened passes closest to the paper's defaults) with all seeds
and the retain prompts, and chooses the first that meets both targets on every concept, else the
best trade-off (concepts passing, then mean erasure + retention); stage 3 reports the chosen
configuration on every forget prompt (paraphrases the method never saw) and UCE's wall time.
Generation dominates the cost; a UCE edit of the Shapes UNet takes well under a second.
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
# The paper's SD defaults (HEAD 28c81ed) first, then one or two knobs changed at a time.
GRID: list[dict] = [
    {},
    {"keys": "tail_span"},
    {"keys": "tail_span", "preserve_scale": "auto"},
    {"guide": ""},
    {"keys": "tail_span", "guide": ""},
    {"expand_prompts": True},
    {"keys": "tail_span", "expand_prompts": True},
    {"keys": "tail_span", "erase_scale": 4.0},
    # Combinations of the knobs that helped most in a first pass of the rows above.
    {"keys": "tail_span", "expand_prompts": True, "guide": ""},
    {"keys": "tail_span", "expand_prompts": True, "erase_scale": 4.0},
    {"keys": "tail_span", "expand_prompts": True, "preserve_scale": "auto"},
]


def _describe(cfg: dict) -> str:
    return cal.describe(cfg, "paper defaults")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=str(ROOT / "bench/world/assets/shapes"))
    ap.add_argument("--seeds", type=int, default=64, help="seeds on the canonical forget prompt (final stage)")
    ap.add_argument("--screen-seeds", type=int, default=16, help="seeds on the canonical forget prompt (screening)")
    ap.add_argument("--retain-seeds", type=int, default=16, help="seeds per retain prompt")
    ap.add_argument("--paraphrase-seeds", type=int, default=8, help="seeds per forget prompt for the chosen config")
    ap.add_argument("--finalists", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs/calibration/uce.md"))
    ap.add_argument("--json", default=None, help="raw results; screened rows found here are reused")
    ap.add_argument("--grid", type=int, default=None, help="screen only the first N configurations (smoke runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench.concepts import concept_from_cfg

    pipe, detector = cal.load(args.world)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    concepts = {c: concept_from_cfg(OmegaConf.load(ROOT / f"conf/concept/{c}.yaml")) for c in CONCEPTS}
    ev = _Evaluator(pipe, detector, original)
    t0 = time.perf_counter()

    # Stage 1 — screen every configuration on the canonical forget prompts (few seeds). Screened
    # rows are kept in --json, so a re-run with the same seeds resumes instead of repeating them.
    screen_seeds = list(range(args.screen_seeds))
    done = _resume(args.json, args.screen_seeds)
    ev.restore()
    base_screen = done.get("base_screen") or {
        n: ev.detect(c, [c.forget_prompts[0]], screen_seeds)[c.forget_prompts[0]] for n, c in concepts.items()
    }
    screened = []
    for cfg in GRID[: args.grid]:
        row = done.get("rows", {}).get(_describe(cfg))
        if row is None:
            det = {}
            for n, c in concepts.items():
                ev.edit(c, cfg)
                det[n] = ev.detect(c, [c.forget_prompts[0]], screen_seeds)[c.forget_prompts[0]]
            row = {"cfg": cfg, "detect_u": det, "seconds": ev.seconds[-len(concepts) :]}
        screened.append(row)
        _dump(args.json, {"screen_seeds": args.screen_seeds, "base_screen": base_screen, "screen": screened})
        print("screen", _describe(cfg), json.dumps(row["detect_u"]), flush=True)

    # Stage 2 — the finalists: every config that screens ≤ 0.20 everywhere, closest to the paper
    # first (else the lowest mean detection), measured with all seeds and the retain prompts.
    ok = [r for r in screened if max(r["detect_u"].values()) <= 0.20]
    order = sorted(ok, key=lambda r: len(r["cfg"])) or sorted(screened, key=lambda r: np.mean(list(r["detect_u"].values())))
    seeds, retain_seeds = list(range(args.seeds)), list(range(args.retain_seeds))
    final_seeds = [args.seeds, args.retain_seeds]
    cached = done.get("final_seeds") == final_seeds
    ev.restore()  # the base model's numbers, not those of the last screened edit
    base = done["base_final"] if cached and done.get("base_final") else {
        n: {**ev.detect(c, [c.forget_prompts[0]], seeds), **ev.fidelity(c, retain_seeds)} for n, c in concepts.items()
    }
    # The guide's own rate: UCE maps the target onto the anchor, so the base model's detection of
    # the concept on the preset's first anchor prompt ("a shape") is the floor an exact edit reaches.
    floor = {n: ev.detect(c, [c.anchor_prompts[0]], seeds)[c.anchor_prompts[0]] for n, c in concepts.items()}
    finals = []
    for r in order[: args.finalists]:
        final = done.get("finals", {}).get(_describe(r["cfg"])) if cached else None
        if final is None:
            rows = {}
            for n, c in concepts.items():
                ev.edit(c, r["cfg"])
                edited = {**ev.detect(c, [c.forget_prompts[0]], seeds), **ev.fidelity(c, retain_seeds)}
                rows[n] = cal.row(base[n], edited, c)
            final = {"cfg": r["cfg"], "concepts": rows, "n_pass": sum(cal.passes(v) for v in rows.values())}
            final["score"] = float(np.mean([1 - v["detect_u"] / max(v["detect_o"], 1e-9) + v["retention"] for v in rows.values()]))
        finals.append(final)
        stage12 = {"screen_seeds": args.screen_seeds, "base_screen": base_screen, "screen": screened}
        _dump(args.json, {**stage12, "final_seeds": final_seeds, "base_final": base, "floor": floor, "finals": finals})
        print("final", _describe(r["cfg"]), json.dumps(final["concepts"]), flush=True)
    full = [f for f in finals if f["n_pass"] == len(CONCEPTS)]
    chosen = full[0] if full else max(finals, key=lambda f: (f["n_pass"], f["score"]))

    # Stage 3 — the chosen configuration on every forget prompt (paraphrases included), and timing.
    para_seeds = list(range(args.paraphrase_seeds))
    paraphrases, timings = {}, []
    for n, c in concepts.items():
        report = ev.edit(c, chosen["cfg"])
        timings.append((n, ev.seconds[-1], report["edit_seconds"]))
        paraphrases[n] = ev.detect(c, list(c.forget_prompts), para_seeds)
    minutes = (time.perf_counter() - t0) / 60
    _write(args, base_screen, screened, finals, floor, chosen, paraphrases, timings, minutes, ev.images)


def _resume(path: str | None, screen_seeds: int) -> dict:
    """Rows of an earlier run with the same screening seeds, keyed by config (and its finals)."""
    if not path or not Path(path).exists():
        return {}
    raw = json.loads(Path(path).read_text())
    if raw.get("screen_seeds") != screen_seeds:
        return {}
    return {
        "base_screen": raw["base_screen"],
        "rows": {_describe(r["cfg"]): r for r in raw["screen"]},
        "final_seeds": raw.get("final_seeds"),
        "base_final": raw.get("base_final"),
        "finals": {_describe(f["cfg"]): f for f in raw.get("finals", [])},
    }


def _dump(path: str | None, raw: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(raw, indent=1))


class _Evaluator:
    """Edits the shipped pipeline (restoring the base UNet first) and scores generations."""

    def __init__(self, pipe, detector, original):
        self.pipe, self.detector, self.original = pipe, detector, original
        self.seconds: list[float] = []
        self.images = 0

    def restore(self) -> None:
        self.pipe.unet.load_state_dict(self.original)

    def edit(self, concept, cfg: dict) -> dict:
        from methods.uce import unlearn

        self.restore()
        torch.manual_seed(0)
        t = time.perf_counter()
        report = unlearn(self.pipe, concept, **cfg)
        self.seconds.append(time.perf_counter() - t)
        return report

    def detect(self, concept, prompts, seeds) -> dict[str, float]:
        """Share of images whose detector argmax on the concept's factor is the concept value."""
        self.images += len(prompts) * len(seeds)
        return cal.forget_rates(self.pipe, concept, self.detector, seeds, prompts)

    def fidelity(self, concept, seeds) -> dict[str, float]:
        """Per retain prompt: mean detection rate of the factors it names."""
        self.images += len(concept.retain_prompts) * len(seeds)
        return cal.retain_fidelity(self.pipe, concept, self.detector, seeds)


def _write(args, base_screen, screened, finals, floor, chosen, paraphrases, timings, minutes, images) -> None:
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_uce.py --out docs/calibration/uce.md --json /tmp/uce_calibration.json"
    lines = [
        "# UCE — Shapes-world calibration",
        "",
        f"Command (2 shared CPU cores, `torch.set_num_threads({args.threads})`; {minutes:.1f} min, {images} images):",
        "",
        f"    {cmd}",
        "",
        "Targets: on each concept's canonical forget prompt (its first), concept detection `det_u` "
        f"≤ 0.20 ({args.seeds} seeds, DDIM 20 steps, guidance 7.5); retain prompts keep ≥ 80% of the "
        "base model's fidelity (`ret` = mean over the 6 retain prompts of fidelity(θ*)/fidelity(θ), "
        f"{args.retain_seeds} seeds each; `min` = the worst retain prompt). Every run edits the shipped "
        "base model; knobs not listed are the paper's SD defaults (`keys=last_token`, guide = the "
        "preset's anchor, preserve = the preset's retain concepts, λ=0.5, s_e=1, s_p=1, no prompt "
        "expansion).",
        "",
        f"## Stage 1 — screening: `det_u` on the canonical forget prompt, {args.screen_seeds} seeds",
        "",
        "| config | " + " | ".join(f"{c} (base {base_screen[c]:.2f})" for c in CONCEPTS) + " | UCE s |",
        "|---|" + "---|" * len(CONCEPTS) + "---|",
    ]
    for r in screened:
        cells = [f"{r['detect_u'][c]:.2f}" for c in CONCEPTS]
        lines.append(f"| {_describe(r['cfg'])} | " + " | ".join(cells) + f" | {np.mean(r['seconds']):.2f} |")
    lines += [
        "",
        f"## Stage 2 — finalists: `det_o → det_u` ({args.seeds} seeds) and `ret (min)`",
        "",
        "`floor` = the base model's detection of the concept on the preset's first anchor prompt "
        "(the guide UCE maps the target onto), the rate an exact edit towards the anchor reaches.",
        "",
        "| config | " + " | ".join(f"{c} (floor {floor[c]:.2f})" for c in CONCEPTS) + " | pass |",
        "|---|" + "---|" * len(CONCEPTS) + "---|",
    ]
    for f in finals:
        cells = [
            f"{v['detect_o']:.2f} → {v['detect_u']:.2f}, ret {v['retention']:.2f} ({v['retention_min']:.2f})"
            for v in f["concepts"].values()
        ]
        mark = " **(chosen)**" if f is chosen else ""
        lines.append(f"| {_describe(f['cfg'])}{mark} | " + " | ".join(cells) + f" | {f['n_pass']}/{len(CONCEPTS)} |")
    lines += [
        "",
        f"Chosen: `{_describe(chosen['cfg'])}`.",
        "",
        f"## Stage 3 — the chosen configuration on every forget prompt ({args.paraphrase_seeds} seeds each)",
        "",
    ]
    for name, rates in paraphrases.items():
        lines.append(f"- {name}: " + "; ".join(f'"{p}" {v:.2f}' for p, v in rates.items()))
    lines += ["", "UCE wall time (the whole `unlearn` call, text encoding included; `edit` = the method's own timer):", ""]
    lines += [f"- {name}: {t:.2f} s (edit {e:.2f} s)" for name, t, e in timings]
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    if args.json:  # add the chosen config, paraphrases and timings to what stages 1–2 dumped
        raw = json.loads(Path(args.json).read_text())
        _dump(args.json, {**raw, "chosen": chosen["cfg"], "paraphrases": paraphrases, "timings": timings})
    print("\n".join(lines))


if __name__ == "__main__":
    main()

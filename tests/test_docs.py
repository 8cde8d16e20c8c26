"""Every file the README, the configs and the code point a reader at exists.

A calibration note cited in a YAML comment or a docstring is the only record of why a default is
what it is; a dangling one reads as evidence that is not there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a repo path (docs/, scripts/, conf/, the packages, tests/), not part of a longer path or URL; templated names
# (probes-<probe>.md, calibrate_<method>.py, {name}) and globs (esd_*_shapes.yaml) stop at '<', '{' or '*' and are skipped
REF = re.compile(r"(?<![\w/.-])((?:docs|scripts|conf|bench|methods|tests|leaderboard)/[A-Za-z0-9_./-]++)")
# paths that are not this repository's: another project's file, named as such where it is cited
ELSEWHERE = {"scripts/convert_original_stable_diffusion_to_diffusers.py",  # diffusers' converter (methods/weights.py)
             # the README's "Add a probe" and "Add a method" examples, for a reader to write (tests/test_readme_examples.py runs them)
             "bench/probes/my_probe.py", "conf/probes/my_probe.yaml", "methods/token_swap.py", "conf/method/token_swap.yaml",
             "conf/method_model/token_swap_shapes.yaml"}


def _sources() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "conf").rglob("*.yaml"))]
    for folder in ("bench", "methods", "leaderboard", "scripts"):
        files += sorted(p for p in (ROOT / folder).rglob("*.py"))
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def _refs(text: str) -> set[str]:
    out = set()
    for m in REF.finditer(text):
        ref = m.group(1).rstrip(".-/")
        if text[m.end():m.end() + 1] in ("<", "{", "*") or text[max(0, m.start() - 7):m.start()].endswith(("--json ", "--out ")):
            continue  # a template or glob, or a file a documented command writes
        if ref not in ELSEWHERE:
            out.add(ref)
    return out


def test_every_repo_path_cited_exists():
    missing = []
    for src in _sources():
        missing += [f"{src.relative_to(ROOT)} cites {ref}" for ref in sorted(_refs(src.read_text(errors="replace"))) if not (ROOT / ref).exists()]
    assert not missing, "cited but missing:\n" + "\n".join(missing)


def test_the_reference_pattern_skips_templates_and_catches_a_real_path():
    text = ("see docs/calibration/probes-<probe>.md, conf/method_model/esd_*_shapes.yaml and scripts/calibrate_<method>.py; docs/calibration/nope.md. "
            "Run it with --out docs/calibration/new.md")
    assert _refs(text) == {"docs/calibration/nope.md"}

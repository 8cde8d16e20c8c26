"""``python -m leaderboard build|publish|screenshot`` — records → static site, Markdown table and CSV.

    python -m leaderboard build [--runs runs] [--results leaderboard/results]
                                [--out runs/leaderboard/site] [--md runs/leaderboard/LEADERBOARD.md] [--strict]
    python -m leaderboard publish [RUN_DIR ...] [--strict]
    python -m leaderboard screenshot [page] [png] [--width 1400] [--height 1500]

``build`` (``make leaderboard``) shows your local runs beside the published records, in an ignored
folder: it never touches a tracked file. ``publish`` (``make publish RUNS=…``) copies the given
finished run folders (record and images) into ``leaderboard/results/`` and rebuilds the tracked
site (``leaderboard/site/``) and ``leaderboard/LEADERBOARD.md`` from the published records alone;
without run folders it only rebuilds them. Every record left out or flagged is printed with its
path and the reason; the page is still built from the valid records. ``--strict`` exits 1 when
there is any such record (CI for the published results).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaderboard.build import LOCAL, MARKDOWN, PUBLISHED, SITE, build, publish


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="preview: local runs beside the published records, in an ignored folder")
    b.add_argument("--runs", type=Path, default=Path("runs"),
                   help="local run records: <runs>/**/record.json (default: runs)")
    b.add_argument("--results", type=Path, default=PUBLISHED,
                   help="published records committed to the repo (default: leaderboard/results)")
    b.add_argument("--out", type=Path, default=LOCAL / "site",
                   help="site folder: index.html, data.js, assets/, records/, results.csv (default: runs/leaderboard/site)")
    b.add_argument("--md", type=Path, default=LOCAL / "LEADERBOARD.md",
                   help="Markdown tables (default: runs/leaderboard/LEADERBOARD.md)")
    b.add_argument("--strict", action="store_true",
                   help="exit 1 if any record was left out or flagged (errors and warnings)")
    pub = sub.add_parser("publish", help="copy finished runs into leaderboard/results and rebuild the tracked site from them")
    pub.add_argument("runs", type=Path, nargs="*", help="run folders (runs/<model>/<concept>/<method>/<job-key>); none = rebuild only")
    pub.add_argument("--strict", action="store_true", help="exit 1 if any published record was left out or flagged")
    pub.add_argument("--images", choices=("first-seed", "all"), default="first-seed",
                     help="publish the image grids of seed-0 records only (default) or of every record")
    s = sub.add_parser("screenshot", help="PNG of a built page with headless chromium (for the README)")
    s.add_argument("page", type=Path, nargs="?", default=SITE / "index.html")
    s.add_argument("png", type=Path, nargs="?", default=Path("docs/leaderboard.png"))
    s.add_argument("--width", type=int, default=1600)
    s.add_argument("--height", type=int, default=1500)
    args = p.parse_args(argv)
    if args.cmd == "screenshot":
        return screenshot(args.page, args.png, args.width, args.height)
    if args.cmd == "publish":
        try:
            for dst in publish(args.runs, PUBLISHED, args.images):
                print(f"published {dst}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        runs, results, out, md = None, PUBLISHED, SITE, MARKDOWN
    else:
        runs, results, out, md = args.runs, args.results, args.out, args.md

    result = build(runs, results, out, md)
    for issue in result.issues:
        print(issue, file=sys.stderr)
    n_err = sum(i.severity == "error" for i in result.issues)
    n_warn = sum(i.severity == "warning" for i in result.issues)
    print(f"leaderboard: {len(result.records)} records in {len(result.rankings)} rankings "
          f"({n_err} left out, {n_warn} warnings) -> {out / 'index.html'}, "
          f"{out / 'results.csv'}, {md}")
    if args.strict and result.problems:
        print(f"leaderboard: --strict: {len(result.problems)} problem(s) above", file=sys.stderr)
        return 1
    return 0


def find_browser() -> str | None:
    """Debian's chromium (or another Chromium-family binary) on PATH."""
    import shutil

    return next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)


def screenshot(page: Path, png: Path, width: int, height: int) -> int:
    """Render ``page`` (file://, no network) with Debian's chromium into ``png``; atomic."""
    import shutil
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        print("error: screenshot needs a chromium binary on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    if not page.is_file():
        print(f"error: `page` must be a built page (python -m leaderboard build), got {str(page)!r}", file=sys.stderr)
        return 2
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shot.png"
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--hide-scrollbars", f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={out}", page.resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "TMPDIR": tmp})
        if r.returncode != 0 or not out.exists():
            print(f"error: chromium failed ({r.returncode}): {r.stderr[-500:]}", file=sys.stderr)
            return 1
        shutil.move(str(out), png)
    print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

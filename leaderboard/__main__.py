"""``python -m leaderboard build`` — records → static site, Markdown table and CSV.

    python -m leaderboard build [--runs runs] [--results leaderboard/results]
                                [--out leaderboard/site] [--md leaderboard/LEADERBOARD.md] [--strict]

Every record left out or flagged is printed with its path and the reason; the page is still
built from the valid records. ``--strict`` exits 1 when there is any such record (CI for the
published results).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaderboard.build import build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the leaderboard from the records")
    b.add_argument("--runs", type=Path, default=Path("runs"),
                   help="local run records: <runs>/**/record.json (default: runs)")
    b.add_argument("--results", type=Path, default=Path("leaderboard/results"),
                   help="published records committed to the repo (default: leaderboard/results)")
    b.add_argument("--out", type=Path, default=Path("leaderboard/site"),
                   help="site folder: index.html, data.js, assets/, records/, results.csv (default: leaderboard/site)")
    b.add_argument("--md", type=Path, default=Path("leaderboard/LEADERBOARD.md"),
                   help="Markdown table for the README (default: leaderboard/LEADERBOARD.md)")
    b.add_argument("--strict", action="store_true",
                   help="exit 1 if any record was left out or flagged (errors and warnings)")
    args = p.parse_args(argv)

    result = build(args.runs, args.results, args.out, args.md)
    for issue in result.issues:
        print(issue, file=sys.stderr)
    n_err = sum(i.severity == "error" for i in result.issues)
    n_warn = sum(i.severity == "warning" for i in result.issues)
    print(f"leaderboard: {len(result.records)} records in {len(result.rankings)} rankings "
          f"({n_err} left out, {n_warn} warnings) -> {args.out / 'index.html'}, "
          f"{args.out / 'results.csv'}, {args.md}")
    if args.strict and result.problems:
        print(f"leaderboard: --strict: {len(result.problems)} problem(s) above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Progress for every long stage, on a terminal and in a log file alike.

On a TTY this is a tqdm bar. Off a TTY (output redirected to a file, CI, Slurm) tqdm's
``disable=None`` would hide the bar entirely — a 48-minute ESD run once showed one line — so
there it prints a plain line every ``interval`` seconds (and at the end) with done/total, the
rate and an ETA. ``CONCEALBENCH_PROGRESS`` = ``bar`` | ``lines`` | ``off`` forces a mode.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
MODES = ("auto", "bar", "lines", "off")


def _mode() -> str:
    mode = os.environ.get("CONCEALBENCH_PROGRESS", "auto").lower()
    if mode not in MODES:
        mode = "auto"
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class Lines:
    """A progress reporter that writes one line per ``interval`` seconds to stderr."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.t0 = 0, time.time()
        self.last = self.t0
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _line(self, now: float) -> None:
        el = now - self.t0
        rate = self.n / el if el > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            head = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
            tail = f", ETA {_duration(eta)}" if eta == eta else ""
        else:
            head, tail = f"{self.n} {self.unit}", ""
        extra = f" [{self.postfix}]" if self.postfix else ""
        print(f"[progress] {self.desc}: {head}, {_duration(el)} elapsed{tail}{extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n and time.time() - self.t0 >= 1.0:
            self._line(time.time())

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, text: str) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: Any) -> None: ...


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, leave: bool = False):
    """A progress object with ``update``, ``set_postfix``, ``write`` and ``close`` (a context manager)."""
    mode = _mode() if enabled else "off"
    if mode == "off":
        return _Off()
    if mode == "lines":
        return Lines(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with progress (the ``tqdm(iterable)`` idiom)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, unit, enabled) as b:
        for x in items:
            yield x
            b.update(1)

"""What the harness hands a method besides the pipeline and the concept.

Methods that cache their own data (FMN's generated concept images, Concept Ablation's anchor
images) or show progress take a keyword ``ctx: MethodContext | None = None``; the harness passes
it explicitly (no environment variables). ``None`` — a method called directly, e.g. in a test or
a notebook — means the defaults below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(".cache/concealbench")


@dataclass(frozen=True)
class MethodContext:
    """``cache_dir``: the job's content-addressed cache root; ``progress``: show progress bars or
    lines for long loops; ``seed``: the job seed (the harness has already seeded torch with it)."""

    cache_dir: Path = DEFAULT_CACHE
    progress: bool = True
    seed: int = 0

    def cache(self, kind: str) -> Path:
        """The folder a method keeps one kind of cached data in (e.g. ``anchors``)."""
        return Path(self.cache_dir) / kind


def context_or_default(ctx: MethodContext | None) -> MethodContext:
    return ctx if ctx is not None else MethodContext()

"""The original model, unchanged: the reference row every method is compared with.

With θ* = θ the classifier cannot tell λ_O from λ_U, so CCS and CRS sit near 0.5, erasure is 0
and retention 1. Any method's numbers are read against this row.
"""
from __future__ import annotations

from typing import Any


def unlearn(pipe: Any, concept: Any) -> dict[str, Any]:
    """Return the pipeline untouched; no parameters change."""
    return {"steps": 0, "nfe": 0, "notes": "no unlearning (reference: original model)"}

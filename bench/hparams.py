"""Hyperparameter declarations read from a method's ``unlearn`` signature.

A method declares its hyperparameters once, as keyword arguments of ``unlearn`` with type hints;
constraints ride along in ``typing.Annotated`` and choices in ``typing.Literal``::

    def unlearn(pipe, concept, *, lr: Annotated[float, Range(gt=0)] = 1e-5,
                variant: Literal["esd-x", "esd-u"] = "esd-x") -> dict: ...

``check_params`` validates a config's ``method.params`` against that signature before any model
is loaded, so a misspelled key or an out-of-range value gets one clear message.
"""
from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Range:
    """Numeric bounds; ``gt``/``ge``/``lt``/``le`` like pydantic's."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, v: float) -> bool:
        return not (
            (self.gt is not None and not v > self.gt)
            or (self.ge is not None and not v >= self.ge)
            or (self.lt is not None and not v < self.lt)
            or (self.le is not None and not v <= self.le)
        )

    def __str__(self) -> str:
        lo = f"> {self.gt}" if self.gt is not None else f">= {self.ge}" if self.ge is not None else ""
        hi = f"< {self.lt}" if self.lt is not None else f"<= {self.le}" if self.le is not None else ""
        return " and ".join(x for x in (lo, hi) if x) or "any number"


@dataclass(frozen=True)
class SafetensorsFile:
    """A path to an existing safetensors file whose header parses (checked before any model loads).

    The file's content hash (``fingerprint``) joins the job key, so replacing the file at the same
    path re-runs the job instead of reusing results computed from the old weights.
    """

    def check(self, v: Any) -> bool:
        return isinstance(v, (str, Path)) and self.problem(v) is None

    @staticmethod
    def problem(v: Any) -> str | None:
        """What is wrong with the file, in words (None: a readable safetensors file with a tensor).

        Reads the format's own framing — an 8-byte little-endian header length, a JSON header, each
        tensor's ``data_offsets`` into the data that follows — so a random-bytes file, a truncated
        download or a header without tensors is named as such, with the byte where it breaks."""
        p = Path(v)
        if not p.exists():
            return "no such file"
        if not p.is_file():
            return "not a file"
        size = p.stat().st_size
        if size < 8:
            return f"not a safetensors file: {size} bytes, shorter than the format's 8-byte header length"
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                return (f"not a safetensors file, or truncated inside its header: the first 8 bytes announce a {n:,}-byte "
                        f"header, but only {size - 8:,} bytes follow")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"not a safetensors file: its {n:,}-byte header is not JSON ({e})"
        if not isinstance(header, dict):
            return "not a safetensors file: its header is not a JSON object"
        tensors = {k: t for k, t in header.items() if k != "__metadata__"}
        if not tensors:
            return "a safetensors file without any tensor"
        data = size - 8 - n
        for name, t in tensors.items():
            off = t.get("data_offsets") if isinstance(t, dict) else None
            if not (isinstance(off, list) and len(off) == 2 and all(isinstance(x, int) for x in off) and 0 <= off[0] <= off[1]):
                return f"not a valid safetensors file: tensor {name!r} has no valid data_offsets"
            if off[1] > data:
                return (f"truncated: tensor {name!r} needs bytes {8 + n + off[0]:,}–{8 + n + off[1]:,}, "
                        f"but the file ends at byte {size:,}")
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001 — a framing we did not anticipate: say what the reader says
            return f"not a readable safetensors file: {e}"
        return None

    @staticmethod
    def fingerprint(v: Any) -> str:
        import hashlib

        h = hashlib.sha256()
        with open(v, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]

    def __str__(self) -> str:
        return "the path of an existing, readable .safetensors file with at least one tensor"


def file_fingerprints(fn: Callable, params: dict[str, Any]) -> dict[str, str]:
    """``{name: content hash}`` for every hyperparameter of ``fn`` declared as a ``SafetensorsFile``."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for name, hint in hints.items():
        if typing.get_origin(hint) is typing.Annotated and params.get(name) is not None:
            for m in typing.get_args(hint)[1:]:
                if isinstance(m, SafetensorsFile):
                    out[name] = m.fingerprint(params[name])
    return out


_NO_DEFAULT = inspect.Parameter.empty


CONTEXT_PARAM = "ctx"  # the harness's MethodContext, not a hyperparameter (bench/context.py)


def declared(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-only hyperparameters of ``fn`` (everything after ``*`` except ``ctx``)."""
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n != CONTEXT_PARAM}


def takes_context(fn: Callable) -> bool:
    """Whether a method accepts the harness's ``ctx`` keyword."""
    return CONTEXT_PARAM in inspect.signature(fn).parameters


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return " and ".join([_describe(base)] + [str(m) for m in meta])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def _check(hint, value) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return _check(base, value) and all(m.check(value) for m in meta if isinstance(m, (Range, SafetensorsFile)))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_check(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_check(inner, v) for v in value)
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _file_problem(hint, value) -> str | None:
    """For a ``SafetensorsFile`` hyperparameter given a path: what is wrong with that file."""
    if typing.get_origin(hint) is typing.Annotated and isinstance(value, str):
        for m in typing.get_args(hint)[1:]:
            if isinstance(m, SafetensorsFile):
                return m.problem(value)
    return None


def check_params(fn: Callable, params: dict[str, Any], prefix: str = "method.params") -> dict[str, Any]:
    """Validate ``params`` against ``fn``'s declared hyperparameters; return them with defaults.

    Raises ``ConfigError`` naming the first bad key: unknown keys list what is allowed.
    """
    decl = declared(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    for key in params:
        if key not in decl:
            allowed = ", ".join(sorted(decl)) or "none"
            raise ConfigError(f"`{prefix}.{key}` is not a hyperparameter of {fn.__module__}; allowed: {allowed}")
    resolved = {}
    for name, p in decl.items():
        value = params.get(name, p.default)
        if value is _NO_DEFAULT or value == "???":  # "???" is OmegaConf's mandatory-missing marker
            raise ConfigError(f"`{prefix}.{name}` is required")
        hint = hints.get(name, typing.Any)
        if not _check(hint, value):
            problem = _file_problem(hint, value)
            if problem:
                raise ConfigError(f"`{prefix}.{name}` = {value!r}: {problem}")
            raise ConfigError(f"`{prefix}.{name}` must be {_describe(hint)}, got {value!r}")
        resolved[name] = value
    return resolved

"""Imported weights: evaluate a model that was unlearned elsewhere, through the same attack and metrics.

Not an unlearning method but a way in for weights trained outside ConcealBench (an official ESD
checkpoint converted to diffusers names, a run from another codebase, a delta from another
machine). ``path`` is a safetensors file holding either

- a **ConcealBench delta** (``delta.safetensors`` of an earlier run: only the changed tensors, with
  ``format=concealbench-delta-v1`` and the base model's hash in its header), which must have been
  made for this very base model — its text-encoder tensors (``text_encoder.*``, e.g. AdvUnlearn's)
  go into the pipeline's text encoder and must have been made for this very text encoder; or
- a **UNet state dict with diffusers parameter names** (full or partial, e.g. only the ``attn2``
  tensors), applied over the base model; tensors named ``text_encoder.<transformers name>`` in it
  (e.g. a text encoder converted from another codebase) are applied over the text encoder.

Anything else is refused with a message naming the file and the first offending tensor: a file
that is not safetensors or is truncated, names from another layout (CompVis ``model.diffusion_model.*``
checkpoints must be converted to diffusers names first, e.g. with diffusers'
``scripts/convert_original_stable_diffusion_to_diffusers.py``), shapes of another architecture, or
a delta made for another base model. Pickled checkpoints (``.pt``/``.ckpt``) are never loaded.

Run:  python -m bench method=weights method.params.path=/path/to/unet.safetensors concept=star
      (``method.name=<label>`` names the leaderboard row).
"""
from __future__ import annotations

from typing import Annotated, Any

from bench.hparams import SafetensorsFile
from bench.pipeline import (
    DELTA_FORMAT,
    DeltaError,
    checked_parts,
    decode_meta,
    load_tensors,
    read_safetensors,
    state_hash,
)


def unlearn(pipe: Any, concept: Any, *, path: Annotated[str, SafetensorsFile()]) -> dict[str, Any]:
    """Load ``path`` into ``pipe.unet`` (and its ``text_encoder.*`` tensors into ``pipe.text_encoder``)
    in place, checked: names, shapes, base model; no training."""
    label = f"`method.params.path` = {path!r}"
    tensors, raw = read_safetensors(path, label)
    is_delta = raw.get("format") == DELTA_FORMAT
    meta = decode_meta(raw) if is_delta else {}
    mine = state_hash(pipe.unet.state_dict()) if is_delta else None  # the base's, before any module is added
    unet_tensors, te_tensors = checked_parts(pipe.unet, pipe.text_encoder, tensors, meta, label)
    kind = "state dict"
    if is_delta:
        base = meta.get("base_hash")
        if base is not None and base != mine:
            raise DeltaError(f"{label} is a delta for base model {base}, not for this one ({mine})")
        kind = f"ConcealBench delta ({meta.get('method')}, {meta.get('concept')})"
    load_tensors(pipe.unet, unet_tensors)
    load_tensors(pipe.text_encoder, te_tensors)
    source = {"path": str(path), "kind": kind, "tensors": len(tensors),
              "components": {"unet": len(unet_tensors), "text_encoder": len(te_tensors)}}
    return {"steps": 0, "nfe": 0, "source": source, "notes": f"imported {len(tensors)} tensors from {path} ({kind})"}

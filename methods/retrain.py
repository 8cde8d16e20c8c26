"""The gold standard: the UNet retrained from scratch on the world's data minus the concept.

DESIGN §1.4: only a model that never learned the concept shows what true forgetting looks like.
Its ψ-curve says how much of the concept the original model's trajectory alone forces at each ψ;
a method's gap to it is concealment. The Shapes world ships one gold UNet per concept preset
(`make world PART=gold CONCEPT=<c>`); it shares the base model's VAE and text encoder. On SD
worlds there is no such model and this method refuses.
"""
from __future__ import annotations

from typing import Any

import torch


def unlearn(pipe: Any, concept: Any) -> dict[str, Any]:
    """Replace ``pipe.unet``'s weights with the concept's gold-standard UNet."""
    from diffusers import UNet2DConditionModel

    if not concept.gold_unet:
        raise ValueError(
            f"`method=retrain` needs a gold-standard UNet for concept {concept.name!r}; this world has none "
            "(the Shapes world ships gold models for its presets; SD worlds have none)"
        )
    gold = UNet2DConditionModel.from_pretrained(concept.gold_unet, torch_dtype=pipe.unet.dtype, use_safetensors=True)
    own = pipe.unet.state_dict()
    theirs = gold.state_dict()
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        raise ValueError(f"gold UNet at {concept.gold_unet} does not match the base UNet's architecture")
    with torch.no_grad():
        pipe.unet.load_state_dict(gold.state_dict())
    return {"steps": 0, "nfe": 0, "notes": f"loaded gold-standard UNet {concept.gold_unet}"}

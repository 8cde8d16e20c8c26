"""delta.safetensors: round trip, and every way a delta file can be refused (bench/pipeline.py)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.pipeline import (
    DeltaError,
    apply_delta,
    read_delta,
    save_delta,
    snapshot_state,
    state_hash,
)
from bench.testing import perturbed_unet, tiny_sd_pipeline


def test_round_trip_restores_exactly_the_edited_weights(tmp_path):
    base = tiny_sd_pipeline().unet
    edited = perturbed_unet(base, scale=0.1, seed=2)
    path = tmp_path / "delta.safetensors"
    names = save_delta(path, snapshot_state(base), edited, {"method": "m", "concept": "star"})
    assert names and all(".attn2." in n for n in names)  # only the changed tensors are stored
    tensors, meta = read_delta(path)
    assert sorted(tensors) == names and meta["method"] == "m" and meta["base_hash"] == state_hash(snapshot_state(base))
    fresh = tiny_sd_pipeline().unet
    apply_delta(fresh, path, base_hash=state_hash(snapshot_state(fresh)))
    assert all(torch.equal(v, edited.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_refuses_wrong_base_plain_safetensors_foreign_names_and_garbage(tmp_path):
    unet = tiny_sd_pipeline().unet
    path = tmp_path / "delta.safetensors"
    save_delta(path, snapshot_state(unet), perturbed_unet(unet), {"method": "m"})
    with pytest.raises(DeltaError, match="was made for base model .*, not this one"):
        apply_delta(unet, path, base_hash="0" * 16)
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain))  # same tensors, no delta header
    with pytest.raises(DeltaError, match="not a ConcealBench delta"):
        apply_delta(unet, plain)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(foreign),
              metadata={"format": '"concealbench-delta-v1"'})
    with pytest.raises(DeltaError, match=r"is foreign to this UNet: 1 of 1 tensors .*CompVis names"):
        apply_delta(unet, foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(DeltaError, match="is not a readable safetensors file"):
        apply_delta(unet, garbage)

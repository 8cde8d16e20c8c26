"""delta.safetensors: round trip, and every way a delta file can be refused (bench/pipeline.py)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.pipeline import (
    DeltaError,
    apply_delta,
    pair_text_encoder,
    read_delta,
    save_delta,
    snapshot_state,
    state_hash,
)
from bench.sampling import SamplerConfig, generate
from bench.testing import perturbed_text_encoder, perturbed_unet, tiny_sd_pipeline

SAMPLER = SamplerConfig(steps=2, guidance=7.5, batch_size=2)


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


def text_encoder_delta(tmp_path, te_base_seed: int = 0):
    """A delta of an edited UNet and text encoder of ``tiny_sd_pipeline()``, the text encoder's
    base taken from ``tiny_sd_pipeline(te_base_seed)``; returns (path, names, edited pipeline)."""
    pipe = tiny_sd_pipeline()
    te_base = snapshot_state(tiny_sd_pipeline(te_base_seed).text_encoder)
    base = snapshot_state(pipe.unet)
    pipe.unet = perturbed_unet(pipe.unet, scale=0.1, seed=2)
    pipe.text_encoder = perturbed_text_encoder(pipe.text_encoder, scale=0.5, seed=3)
    path = tmp_path / "delta.safetensors"
    names = save_delta(path, base, pipe.unet, {"method": "m", "concept": "star"}, text_encoder_base=te_base,
                       text_encoder=pipe.text_encoder)
    return path, names, pipe


def test_text_encoder_tensors_round_trip_and_give_the_edited_pipelines_images(tmp_path):
    path, names, edited = text_encoder_delta(tmp_path)
    te_names = [n for n in names if n.startswith("text_encoder.")]
    assert te_names and all(".encoder.layers.0.mlp." in n for n in te_names)  # only the changed ones
    assert any(".attn2." in n for n in names)
    tensors, meta = read_delta(path)
    fresh = tiny_sd_pipeline()
    assert meta["base_hash"] == state_hash(snapshot_state(fresh.unet))  # the UNet's hash, as ever
    assert meta["text_encoder_base_hash"] == state_hash(snapshot_state(fresh.text_encoder))
    theta = tiny_sd_pipeline().unet
    apply_delta(fresh.unet, path, base_hash=state_hash(snapshot_state(theta)), text_encoder=fresh.text_encoder)
    for module in ("unet", "text_encoder"):
        mine, theirs = getattr(fresh, module).state_dict(), getattr(edited, module).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), module
    want = generate(edited, edited.unet, "a star", [0, 1], SAMPLER)
    assert torch.equal(generate(fresh, fresh.unet, "a star", [0, 1], SAMPLER), want)
    # The harness's pairing: the original pipeline runs θ* with θ*'s own text encoder, θ with its own.
    base = tiny_sd_pipeline()
    star = perturbed_unet(base.unet, scale=0.1, seed=2)
    pair_text_encoder(star, fresh.text_encoder)
    assert torch.equal(generate(base, star, "a star", [0, 1], SAMPLER), want)
    assert not torch.equal(generate(base, base.unet, "a star", [0, 1], SAMPLER), want)
    assert "_concealbench_text_encoder" not in str(list(star.state_dict()))  # not a submodule


def test_unet_only_delta_is_unchanged_when_the_text_encoder_is_untouched(tmp_path):
    pipe = tiny_sd_pipeline()
    base, edited = snapshot_state(pipe.unet), perturbed_unet(pipe.unet)
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_delta(old, base, edited, {"method": "m"})
    names = save_delta(new, base, edited, {"method": "m"}, text_encoder_base=snapshot_state(pipe.text_encoder),
                       text_encoder=pipe.text_encoder)
    (t_old, m_old), (t_new, m_new) = read_delta(old), read_delta(new)
    assert m_new == m_old and "text_encoder_base_hash" not in m_new  # the same header, the same tensors
    assert sorted(t_new) == sorted(t_old) == names and all(torch.equal(t_new[k], t_old[k]) for k in names)
    assert not [n for n in names if n.startswith("text_encoder.")]
    fresh = tiny_sd_pipeline().unet
    apply_delta(fresh, new, base_hash=state_hash(base))  # no text encoder needed
    assert all(torch.equal(v, edited.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_text_encoder_tensors_for_another_base_are_refused_naming_the_tensor(tmp_path):
    pipe = tiny_sd_pipeline()
    path, names, _ = text_encoder_delta(tmp_path, te_base_seed=1)  # made against another text encoder
    first = min(n for n in names if n.startswith("text_encoder."))
    with pytest.raises(DeltaError, match=rf"its text-encoder tensors \(first '{first}'\) were made for text encoder .*, not this one"):
        apply_delta(pipe.unet, path, text_encoder=pipe.text_encoder)
    good, names, _ = text_encoder_delta(tmp_path / "good")
    first = min(n for n in names if n.startswith("text_encoder."))
    with pytest.raises(DeltaError, match=rf"holds \d+ text-encoder tensors \(first '{first}'\) but no text encoder was given"):
        apply_delta(pipe.unet, good)
    name, t = next((k, v) for k, v in pipe.text_encoder.state_dict().items() if "layers.1.mlp.fc1.weight" in k)
    header = {"format": '"concealbench-delta-v1"'}
    shaped = tmp_path / "shaped.safetensors"
    save_file({f"text_encoder.{name}": torch.zeros(t.shape[0] + 1, *t.shape[1:])}, str(shaped), metadata=header)
    with pytest.raises(DeltaError, match=rf"tensor 'text_encoder.{name}' has shape .*, this text encoder's is"):
        apply_delta(pipe.unet, shaped, text_encoder=pipe.text_encoder)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"text_encoder.transformer.resblocks.0.ln_1.weight": torch.zeros(2)}, str(foreign), metadata=header)
    with pytest.raises(DeltaError, match=r"is foreign to this text encoder: 1 of 1 tensors .*first 'text_encoder.transformer.resblocks.0.ln_1.weight'"):
        apply_delta(pipe.unet, foreign, text_encoder=pipe.text_encoder)
    before = snapshot_state(pipe.text_encoder)
    assert all(torch.equal(v, before[k]) for k, v in snapshot_state(tiny_sd_pipeline().text_encoder).items())  # nothing loaded


def test_partial_diffusion_runs_theta_with_its_encoder_and_theta_star_with_its_own():
    from bench.sampling import continue_from, prefix_snapshots, split_generate

    pipe = tiny_sd_pipeline()
    star = perturbed_unet(pipe.unet, scale=0.1, seed=2)
    pair_text_encoder(star, perturbed_text_encoder(pipe.text_encoder, scale=0.5, seed=3))
    seeds = [0, 1]
    only_star = generate(pipe, star, "a star", seeds, SAMPLER)  # θ* with its own encoder from step 0
    assert torch.equal(split_generate(pipe, pipe.unet, star, "a star", seeds, 0.0, SAMPLER), only_star)
    assert torch.equal(split_generate(pipe, pipe.unet, star, "a star", seeds, 1.0, SAMPLER),
                       generate(pipe, pipe.unet, "a star", seeds, SAMPLER))
    half = split_generate(pipe, pipe.unet, star, "a star", seeds, 0.5, SAMPLER)
    snap = prefix_snapshots(pipe, pipe.unet, "a star", seeds, [0.5], SAMPLER)[0.5]
    assert torch.equal(continue_from(pipe, star, snap, "a star", SAMPLER), half)
    unpaired = perturbed_unet(pipe.unet, scale=0.1, seed=2)  # the same UNet with the pipeline's encoder
    assert not torch.equal(split_generate(pipe, pipe.unet, unpaired, "a star", seeds, 0.5, SAMPLER), half)

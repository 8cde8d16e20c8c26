"""method=weights: imported safetensors weights, and every way a weight file can be bad."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from bench.hparams import ConfigError, check_params, file_fingerprints
from bench.pipeline import DeltaError, save_delta, snapshot_state
from bench.run import execute
from bench.testing import perturbed_unet, tiny_sd_pipeline
from methods.weights import unlearn
from tests.conftest import needs_world

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg_with(tmp_path, *overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", "eval=smoke", "method=weights", "concept=star",
                                                        f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *overrides])


def assert_bad_input(tmp_path, capsys, path, message):
    assert execute(cfg_with(tmp_path, f"method.params.path={path}")) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("record.json"))
    assert not list(tmp_path.rglob("delta.safetensors"))


def test_missing_path_is_required(tmp_path, capsys):
    assert execute(cfg_with(tmp_path)) == 2
    assert "`method.params.path` is required" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "why"), [
    (b"", "not a safetensors file: 0 bytes, shorter than the format's 8-byte header length"),
    (b"\x00" * 7, "not a safetensors file: 7 bytes, shorter than the format's 8-byte header length"),
    (b"not safetensors at all, just text\n" * 4, "not a safetensors file, or truncated inside its header: the first 8 bytes announce a"),
    (b"\x04\x00\x00\x00\x00\x00\x00\x00{no}", "not a safetensors file: its 4-byte header is not JSON"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "a safetensors file without any tensor"),
])
def test_corrupt_file_is_refused_before_loading_saying_why(tmp_path, capsys, content, why):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    assert_bad_input(tmp_path, capsys, bad, f"`method.params.path` = '{bad}': {why}")


def test_truncated_file_is_refused_naming_the_tensor_and_byte(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    cut.write_bytes(data[:-100])
    assert_bad_input(tmp_path, capsys, cut, f"`method.params.path` = '{cut}': truncated: tensor 'w' needs bytes "
                                            f"{len(data) - 64 * 64 * 4:,}–{len(data):,}, but the file ends at byte {len(data) - 100:,}")
    assert_bad_input(tmp_path, capsys, tmp_path / "absent.safetensors", "absent.safetensors': no such file")


@needs_world
def test_foreign_file_is_refused_with_the_offending_tensor(tmp_path, capsys):
    foreign = tmp_path / "compvis.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, str(foreign))
    assert_bad_input(tmp_path, capsys, foreign, "is foreign to this UNet: 1 of 1 tensors have no counterpart, "
                                                "first 'model.diffusion_model.input_blocks.0.0.weight' (CompVis names")
    assert not list((tmp_path / "runs").rglob("*/weights/*"))  # no empty job directory left behind
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_dir() and p.name != "wandb" and not any(p.iterdir())]


def test_wrong_shape_and_wrong_base_are_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    name, t = next((k, v) for k, v in pipe.unet.state_dict().items() if "attn2.to_k" in k)
    shaped = tmp_path / "shape.safetensors"
    save_file({name: torch.zeros(t.shape[0] + 1, *t.shape[1:])}, str(shaped))
    with pytest.raises(DeltaError, match=rf"tensor '{name}' has shape"):
        unlearn(pipe, None, path=str(shaped))
    # a ConcealBench delta made against another base model
    other = perturbed_unet(tiny_sd_pipeline().unet, scale=0.1, seed=3)
    edited = perturbed_unet(tiny_sd_pipeline().unet, scale=0.1, seed=4)
    delta = tmp_path / "delta.safetensors"
    save_delta(delta, snapshot_state(other), edited, {"method": "x", "concept": "y"})
    with pytest.raises(DeltaError, match="is a delta for base model .*, not for this one"):
        unlearn(pipe, None, path=str(delta))


def test_state_dict_and_delta_import_change_exactly_their_tensors(tmp_path):
    pipe = tiny_sd_pipeline()
    base = snapshot_state(pipe.unet)
    names = [k for k in base if ".attn2.to_v." in k]
    sd = {k: base[k] + 0.5 for k in names}
    f = tmp_path / "partial.safetensors"
    save_file(sd, str(f))
    report = unlearn(pipe, None, path=str(f))
    assert report["source"]["tensors"] == len(names) and report["nfe"] == 0
    after = pipe.unet.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], sd[k] if k in sd else v), k
    # the delta of that edit, imported into a fresh copy of the same base, gives the same weights
    delta = tmp_path / "delta.safetensors"
    save_delta(delta, base, pipe.unet, {"method": "weights", "concept": "star"})
    fresh = tiny_sd_pipeline()
    report = unlearn(fresh, None, path=str(delta))
    assert "ConcealBench delta" in report["source"]["kind"]
    assert all(torch.equal(fresh.unet.state_dict()[k], v) for k, v in after.items())


def test_file_content_enters_the_job_key(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    params = check_params(unlearn, {"path": str(f)})
    first = file_fingerprints(unlearn, params)
    save_file({"a": torch.ones(2)}, str(f))
    second = file_fingerprints(unlearn, params)
    assert set(first) == {"path"} and first != second
    with pytest.raises(ConfigError):
        check_params(unlearn, {"path": str(tmp_path)})  # a directory is not a safetensors file


def test_text_encoder_delta_imports_into_the_text_encoder_and_gives_the_edited_images(tmp_path):
    from bench.sampling import SamplerConfig, generate
    from bench.testing import perturbed_text_encoder

    edited = tiny_sd_pipeline()
    base, te_base = snapshot_state(edited.unet), snapshot_state(edited.text_encoder)
    edited.text_encoder = perturbed_text_encoder(edited.text_encoder, scale=0.5, seed=3)
    delta = tmp_path / "delta.safetensors"
    names = save_delta(delta, base, edited.unet, {"method": "advunlearn", "concept": "star"},
                       text_encoder_base=te_base, text_encoder=edited.text_encoder)
    assert names and all(n.startswith("text_encoder.") for n in names)  # a text-encoder-only delta
    fresh = tiny_sd_pipeline()
    report = unlearn(fresh, None, path=str(delta))
    assert report["source"]["components"] == {"unet": 0, "text_encoder": len(names)}
    sampler = SamplerConfig(steps=2, guidance=7.5, batch_size=2)
    assert torch.equal(generate(fresh, fresh.unet, "a star", [0, 1], sampler), generate(edited, edited.unet, "a star", [0, 1], sampler))
    # a plain state dict may carry text-encoder tensors too, under either transformers spelling
    plain = tmp_path / "plain.safetensors"
    name = next(n for n in names if n.endswith("fc1.weight")).removeprefix("text_encoder.")
    save_file({f"text_encoder.text_model.{name}": torch.ones_like(te_base[name])}, str(plain))
    unlearn(fresh, None, path=str(plain))
    assert torch.equal(fresh.text_encoder.state_dict()[name], torch.ones_like(te_base[name]))


def test_text_encoder_delta_for_another_base_is_refused_naming_the_tensor(tmp_path):
    from bench.testing import perturbed_text_encoder

    other = tiny_sd_pipeline(seed=1)  # another text encoder (same architecture), the same UNet as below
    pipe = tiny_sd_pipeline()
    delta = tmp_path / "delta.safetensors"
    names = save_delta(delta, snapshot_state(pipe.unet), pipe.unet, {"method": "x"}, text_encoder_base=snapshot_state(other.text_encoder),
                       text_encoder=perturbed_text_encoder(other.text_encoder, scale=0.5))
    first = names[0]
    assert first.startswith("text_encoder.encoder.layers.0.mlp.")
    with pytest.raises(DeltaError, match=rf"its text-encoder tensors \(first '{first}'\) were made for text encoder"):
        unlearn(pipe, None, path=str(delta))
    shaped = tmp_path / "shaped.safetensors"
    save_file({"text_encoder.encoder.layers.0.mlp.fc1.weight": torch.zeros(3, 3)}, str(shaped))
    with pytest.raises(DeltaError, match=r"tensor 'text_encoder.encoder.layers.0.mlp.fc1.weight' has shape \(3, 3\), this text encoder's is"):
        unlearn(pipe, None, path=str(shaped))

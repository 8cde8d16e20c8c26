"""The Shapes world: renderer, grammar, tokenizer, pipeline round trip, detector, micro build."""
import json

import numpy as np
import pytest
import torch

from bench.world import captions
from bench.world.render import COLOURS, SHAPES, TEXTURES, render, render_random
from tests.conftest import ROOT, WORLD, needs_world


def test_renderer_is_deterministic_and_seed_sensitive():
    a, b = render_random(64, seed=3), render_random(64, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.shape, b.shape)
    c = render_random(64, seed=4)
    assert not np.array_equal(a.images, c.images)
    assert a.images.dtype == np.uint8 and a.images.shape == (64, 32, 32, 3)


def test_renderer_covers_every_factor_value():
    b = render_random(2000, seed=0)
    assert set(b.shape) == set(range(len(SHAPES)))
    assert set(b.colour) == set(range(len(COLOURS)))
    assert set(b.texture) == set(range(len(TEXTURES)))
    # exclusion (gold-standard data) never yields the excluded value
    ex = render_random(500, seed=1, exclude={"shape": SHAPES.index("star")})
    assert SHAPES.index("star") not in set(ex.shape)


def test_renderer_factors_are_visible():
    # the shape colour is the dominant saturated colour; plain backgrounds are grey
    b = render([0] * 6, list(range(6)), [0] * 6, seed=0)
    centre = b.images[:, 14:18, 14:18].reshape(6, -1, 3).mean(1)
    assert np.argmax(centre[0]) == 0  # red
    assert np.argmax(centre[2]) == 2  # blue
    corner = b.images[:, 0, 0].astype(int)
    assert np.all(np.abs(corner[:, 0] - corner[:, 1]) <= 1)  # grey background
    with pytest.raises(ValueError, match="shape"):
        render([7], [0], [0], seed=0)


def test_grammar_paraphrases_parse_back():
    assert captions.parse("a red five-pointed star on a dotted background") == {"shape": "star", "colour": "red", "texture": "dots"}
    assert captions.parse("a crimson pentagram") == {"shape": "star", "colour": "red"}
    assert captions.parse("a shape on a pinstriped background") == {"texture": "stripes"}
    assert captions.parse("a coloured object") == {}
    with pytest.raises(ValueError, match="two shapes"):
        captions.parse("a star and a heart")
    rng = np.random.default_rng(0)
    for _ in range(500):
        s, c, t = (int(rng.integers(n)) for n in (6, 6, 4))
        cap = captions.sample_caption(s, c, t, rng)
        spec = captions.parse(cap)
        # a caption never names a factor value the image does not have
        assert spec.get("shape", SHAPES[s]) == SHAPES[s]
        assert spec.get("colour", COLOURS[c]) == COLOURS[c]
        assert spec.get("texture", TEXTURES[t]) == TEXTURES[t]
    # paraphrases exist that avoid every canonical word
    assert "star" not in "pentagram" and captions.parse("pentagram")["shape"] == "star"


def test_random_prompts_are_fully_specified_and_excluded():
    ps = captions.random_prompts(20, seed=0, exclude={"a red star on a striped background"})
    assert len(set(ps)) == 20
    for p in ps:
        assert set(captions.parse(p)) == {"shape", "colour", "texture"}


def test_tokenizer_round_trip_sd_ids(tmp_path):
    from bench.world.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok", model_max_length=77)
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # SD v1.x CLIP ids
    assert len(ids) == 77 and set(ids[7:]) == {49407}  # EOS padding as in SD 1.x
    assert tok.decode(ids[1:6]) == "a photo of a cat"
    short = build_clip_tokenizer(tmp_path / "tok16", model_max_length=16)
    enc = short("a yellow five-pointed star on a pinstriped background", padding="max_length").input_ids
    assert len(enc) == 16 and enc[-1] == 49407


@needs_world
def test_shipped_pipeline_loads_with_from_pretrained_and_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(WORLD), torch_dtype=torch.float32)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    pipe.save_pretrained(tmp_path / "copy")
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "copy"), torch_dtype=torch.float32)
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    pipe.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(0)]
    img = pipe("a red star", num_inference_steps=4, generator=g, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    info = json.loads((WORLD / "world.json").read_text())
    assert info["sampling"]["scheduler"] == type(pipe.scheduler).__name__


@needs_world
def test_shipped_detector_reads_fresh_renders():
    from bench.world.detector import HEADS, Detector

    det = Detector.load(WORLD / "detector")
    b = render_random(600, seed=424242)
    p = det.predict(b.images)
    labels = {"shape": b.shape, "colour": b.colour, "texture": b.texture}
    for h in HEADS:
        assert (p[h].argmax(1) == labels[h]).mean() >= 0.98, h
    feats = det.embed(b.images[:8])
    assert feats.shape == (8, det.feature_dim)


@needs_world
def test_the_detector_reads_an_image_array_the_same_whatever_its_memory_layout():
    # a freshly decoded batch is an NCHW buffer seen as NHWC; the same images read back from a stage or cache file
    # are C-contiguous. Their features once differed by 1e-6 (NCHW against channels-last convolutions), so a job's
    # KID depended on whether its λ_O came from the cache.
    from bench.world.detector import Detector

    det = Detector.load(WORLD / "detector")
    fresh = np.ascontiguousarray(render_random(40, seed=7).images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    stored = np.ascontiguousarray(fresh)
    assert not fresh.flags["C_CONTIGUOUS"] and np.array_equal(fresh, stored)
    assert np.array_equal(det.embed(fresh), det.embed(stored))
    assert all(np.array_equal(det.predict(fresh)[h], det.predict(stored)[h]) for h in ("shape", "colour", "texture"))


@needs_world
def test_shipped_detector_reads_shape_and_texture_through_dull_tones():
    """Generated images are darker and duller than renders: a dark cross must stay a cross."""
    from bench.world.detector import Detector

    det = Detector.load(WORLD / "detector")
    b = render_random(600, seed=515151)
    x = b.images.astype(np.float32)
    for shifted in (x * 0.5, 0.5 * x + 0.5 * x.mean(-1, keepdims=True)):
        p = det.predict(np.clip(shifted, 0, 255).astype(np.uint8))
        assert (p["shape"].argmax(1) == b.shape).mean() >= 0.97
        assert (p["texture"].argmax(1) == b.texture).mean() >= 0.97
    crosses = render([SHAPES.index("cross")] * 200, list(range(6)) * 33 + [0, 1], [TEXTURES.index("dots")] * 200, seed=7)
    dark = (crosses.images.astype(np.float32) * 0.5).astype(np.uint8)
    assert (det.predict(dark)["shape"].argmax(1) == SHAPES.index("cross")).mean() >= 0.97


def test_a_tinted_background_is_off_the_oracles_domain_and_a_grey_one_never():
    from bench.world.fidelity import MAX_TINT, background_tint, off_domain

    b = render_random(400, seed=616161)
    assert background_tint(b.images).max() == 0.0 and not off_domain(b.images).any()  # every render: grey
    blue = b.images.copy()
    blue[:, :2], blue[:, -2:], blue[:, :, :2], blue[:, :, -2:] = (40, 60, 200), (40, 60, 200), (40, 60, 200), (40, 60, 200)
    assert off_domain(blue).all() and background_tint(blue).min() > MAX_TINT
    # a shape reaching into the frame on one side leaves the median on the background
    edge = b.images.copy()
    edge[:, :2] = (230, 20, 20)
    assert not off_domain(edge).any()


@needs_world
def test_the_oracle_on_tinted_backgrounds_is_measured_from_the_same_draws():
    from bench.world.detector import Detector
    from bench.world.fidelity import MAX_TINT, tinted_accuracy

    acc = tinted_accuracy(Detector.load(WORLD / "detector"), n=300, tints=(0.0, 1.0))
    for colour in ("blue", "yellow", "red"):
        plain, full = acc[f"{colour}_0"], acc[f"{colour}_1"]
        assert plain["frame_tint"] == 0.0 and plain["shape"] >= 0.98  # mix 0 is the plain render
        assert full["frame_tint"] > MAX_TINT  # the full tint is off the domain by the same measure


@needs_world
def test_every_shapes_prompt_score_records_its_off_domain_share():
    from omegaconf import OmegaConf

    from bench.concepts import concept_from_cfg
    from bench.scorers import aggregate, prompt_scores
    from bench.world.detector import Detector
    from bench.worlds import ShapesDetector

    det = ShapesDetector(Detector.load(WORLD / "detector"))
    concept = concept_from_cfg(OmegaConf.load(ROOT / "conf" / "concept" / "blue.yaml"))
    o = render([SHAPES.index("star")] * 16, [COLOURS.index("blue")] * 16, [0] * 16, seed=3).images
    u = o.copy()
    u[:8, :2], u[:8, -2:], u[:8, :, :2], u[:8, :, -2:] = (40, 60, 200), (40, 60, 200), (40, 60, 200), (40, 60, 200)
    m, units = prompt_scores(det, concept, "a blue star on a plain background", "forget", o, u, n=8, seed=0)
    assert m["off_domain_u"].value == 0.5 and units["off"] == [1] * 8 + [0] * 8  # θ*'s images, not θ's
    job, _ = aggregate([{"class": "forget", "prompt": "p", "metrics": {k: v.to_dict() for k, v in m.items()},
                         "units": units, "curve": []}], "forget", seed=0)
    assert job["off_domain_u"]["value"] == 0.5 and job["off_domain_u"]["ci"] is not None


def test_micro_world_build_runs_and_resumes(tmp_path):
    """A handful of steps of every training job, then an interrupted job resumes identically."""
    from bench.world import train

    cfg = train.BuildConfig(
        n_train=256, n_test=64, build_dir=tmp_path / "b", out_dir=tmp_path / "o",
        vae_steps=3, vae_batch=8, detector_steps=3, detector_batch=16, unet_steps=4, gold_steps=2,
        unet_batch=8, eval_every=1000, eval_seeds=1, ckpt_every=2, warmup=1,
    )
    torch.set_num_threads(1)
    vae_dir = train.train_vae(cfg)
    det_dir = train.train_detector(cfg, vae_dir)
    base = train.train_unet(cfg, vae_dir, det_dir)
    assert (base / "unet" / "config.json").exists() and (base / "text_encoder" / "config.json").exists()
    gold = train.train_unet(cfg, vae_dir, det_dir, concept="star", text_dir=base / "text_encoder")
    assert (gold / "unet" / "config.json").exists()
    # resume: a second base job killed at step 2 and restarted ends with the same weights
    from safetensors.torch import load_file

    cfg2 = train.BuildConfig(**{**cfg.__dict__, "build_dir": tmp_path / "b2", "stop_at": 2})
    (tmp_path / "b2").mkdir()
    for name in ("data-256-0", "latents-256-0.npy"):
        src = tmp_path / "b" / name
        (tmp_path / "b2" / name).symlink_to(src, target_is_directory=src.is_dir())
    assert train.train_unet(cfg2, vae_dir, det_dir) is None
    cfg2.stop_at = None
    resumed = train.train_unet(cfg2, vae_dir, det_dir)
    a = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_world
def test_world_check_of_one_gold_merges_into_an_existing_table(tmp_path, capsys):
    """``check --golds star``: only that gold is measured and merged into ``check.json``; the rest stays."""
    from bench.world.check import run_check

    (tmp_path / "check.json").write_text(json.dumps({"seeds": 1, "base": ["kept"], "gold": {"red": {"kept": True}}}))
    got = run_check(WORLD, seeds=1, out=tmp_path, golds=["star"])
    assert set(got) == {"star"} and set(got["star"]["forget_detection"]) and 0 <= got["star"]["forget_detection_mean"] <= 1
    merged = json.loads((tmp_path / "check.json").read_text())
    assert merged["base"] == ["kept"] and merged["gold"]["red"] == {"kept": True} and merged["gold"]["star"] == got["star"]
    with pytest.raises(SystemExit) as e:
        run_check(WORLD, seeds=2, out=tmp_path, golds=["star"])  # another seed count is not merged
    assert e.value.code == 2 and "differs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_check(WORLD, seeds=1, golds=["nope"])
    assert e.value.code == 2 and "no shipped gold for ['nope']" in capsys.readouterr().err

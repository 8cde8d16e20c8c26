"""Config composition and validation: one clear message naming key and value, before any load."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bench.hparams import ConfigError, Range, check_params
from bench.run import execute

CONF = str(Path(__file__).resolve().parents[1] / "conf")
WORLD = Path(__file__).resolve().parents[1] / "bench" / "world" / "assets" / "shapes"


def cfg_with(*overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["probes.partial_diffusion.psi=[0.1,1.5]"], "`probes.partial_diffusion.psi` values must be numbers in [0, 1], got 1.5"),
        (["probes.partial_diffusion.psi=[0.3,0.1]"], "`probes.partial_diffusion.psi` must be sorted and without duplicates"),
        (["probes.partial_diffusion.psi=[0.1,0.1]"], "`probes.partial_diffusion.psi` must be sorted and without duplicates"),
        (["probes.partial_diffusion.split=middle"], "`probes.partial_diffusion.split` must be one of step, timestep, got 'middle'"),
        (["probes.partial_diffusion.seeds=1"], "`probes.partial_diffusion.seeds` must be an integer >= 2"),
        (["+probes.partial_diffusion.psis=[0.1]"], "`probes.partial_diffusion.psis` is not a setting of the partial_diffusion probe; allowed:"),
        (["eval.classifier.momentum=1.0"], "`eval.classifier.momentum` must be in [0, 1), got 1.0"),
        (["eval.classifier.val_frac=0.95"], "`eval.classifier.val_frac` must be a number in [0.01, 0.9], got 0.95"),
        (["+eval.classifier.lrr=0.1"], "`eval.classifier.lrr` is not a classifier setting; allowed:"),
        (["eval.n=3"], "`eval.n` = 3 is too small"),
        (["eval.steps=0"], "`eval.steps` must be an integer in [1, inf], got 0"),
        (["eval.classifier.backbone=vgg"], "`eval.classifier.backbone` must be one of"),
        (["+method.params.lr=0.1"], "`method.params.lr` is not a hyperparameter of methods.noop; allowed: none"),
        (["out_dir=FILE/sub"], "`out_dir` must be a writable directory, got"),
        (["model.path=/tmp"], "`model.path` must be a directory holding a diffusers pipeline"),
        (["concept.kind=colour"], "`concept.kind` must be one of"),
    ],
)
def test_bad_config_gets_one_clear_message_and_exit_2(overrides, message, capsys, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    overrides = [o.replace("FILE", str(tmp_path / "file")) for o in overrides]
    cfg = cfg_with(f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *overrides)
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not list((tmp_path).rglob("record.json"))


def test_annotated_hyperparameters_are_checked():
    from typing import Annotated, Literal

    def unlearn(pipe, concept, *, lr: Annotated[float, Range(gt=0)] = 1e-5, steps: Annotated[int, Range(ge=1)] = 10,
                variant: Literal["a", "b"] = "a", name: str | None = None):
        return {}

    assert check_params(unlearn, {"lr": 1e-3}) == {"lr": 1e-3, "steps": 10, "variant": "a", "name": None}
    with pytest.raises(ConfigError, match=r"`method.params.lr` must be float and > 0, got -1"):
        check_params(unlearn, {"lr": -1})
    with pytest.raises(ConfigError, match=r"`method.params.steps` must be int and >= 1, got 0"):
        check_params(unlearn, {"steps": 0})
    with pytest.raises(ConfigError, match=r"`method.params.variant` must be one of 'a', 'b', got 'c'"):
        check_params(unlearn, {"variant": "c"})
    with pytest.raises(ConfigError, match=r"`method.params.lrr` is not a hyperparameter .*allowed: lr, name, steps, variant"):
        check_params(unlearn, {"lrr": 1})


@pytest.mark.parametrize(("args", "message"), [
    (["method=nope"], "error: `method` = 'nope' is not one of the options in conf/method/: advunlearn, ca_model, ca_noise,"),
    (["method=esd", "method.params.lrr=1"], "error: `method.params.lrr` is not a hyperparameter of methods.esd; allowed: batch_size,"),
    (["eval.nn=3"], "error: `eval.nn` is not a key of the config (a typo? to add a new key use +eval.nn=…)"),
    (["eval.n=[1,"], "error: cannot parse the override 'eval.n=[1,'"),
    (["probes=[partial_diffusion,nope]"], "error: `probes` = 'nope' is not one of the options in conf/probes/: adversarial_prompt, all, completion,"),
])
def test_bad_command_line_override_is_one_line_and_exit_2(tmp_path, args, message):
    """The README promises one message and exit 2 for an unknown option or a misspelled key: Hydra's own report exits 1."""
    r = subprocess.run([sys.executable, "-m", "bench", *args, "logger=none", f"out_dir={tmp_path}/runs"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith(message), r.stderr
    assert not (tmp_path / "runs").exists() and not Path("outputs").exists()


@pytest.mark.parametrize("key", ["concept.name", "method.name", "model.name"])
@pytest.mark.parametrize("value", ["../../../escaped", "a/b", "/tmp/abs", "''", ".hidden", "a..b"])
def test_names_that_become_folders_must_be_safe_slugs(tmp_path, capsys, key, value):
    cfg = cfg_with(f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", f"{key}={value}")
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert f"error: `{key}` must be a name of 1-64 letters, digits and _ . + - (it becomes a folder name" in err, err
    assert err.count("error:") == 1 and not (tmp_path / "runs").exists()
    assert not list(tmp_path.parent.rglob("escaped"))


def test_out_dir_that_cannot_be_created_is_caught(tmp_path, capsys):
    # /sys passes os.access as root but refuses new folders
    cfg = cfg_with("out_dir=/sys/concealbench-test", f"cache_dir={tmp_path}/cache")
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert "error: `out_dir` must be a writable directory, got '/sys/concealbench-test'" in err and "Traceback" not in err


def test_model_path_with_only_model_index_names_the_missing_folders(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    shutil.copy(WORLD / "model_index.json", tmp_path / "m" / "model_index.json")
    cfg = cfg_with(f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", f"model.path={tmp_path}/m")
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert f"error: `model.path` = '{tmp_path}/m' names a pipeline but lacks its scheduler, text_encoder, tokenizer, unet, vae, detector folders" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["advunlearn", "esd", "mace", "receler", "salun", "sdd", "spm", "stereo"])
def test_a_concept_without_a_word_to_erase_is_refused_before_any_weight_moves(name, tmp_path):
    import importlib
    import inspect

    from bench.context import MethodContext
    from bench.testing import changed, pipe_weights, tiny_concept, tiny_sd_pipeline

    unlearn = importlib.import_module(f"methods.{name}").unlearn
    kw = {"ctx": MethodContext(cache_dir=tmp_path, progress=False)} if "ctx" in inspect.signature(unlearn).parameters else {}
    pipe = tiny_sd_pipeline(text_len=16)
    before = pipe_weights(pipe)
    with pytest.raises(ConfigError, match=r"^`concept.target` of 'star' names no word to erase, got ' , '$"):
        unlearn(pipe, tiny_concept(target=" , "), **kw)
    assert not changed(before, pipe_weights(pipe))

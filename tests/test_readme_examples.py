"""The README's worked examples, "Add a method" and "Add a probe", run as written.

Each code block of those sections has a comment line naming the file it is (``# methods/token_swap.py``).
The tests write the blocks, exactly as printed, to a temporary folder, import each module under the name its YAML's
``_target_`` gives, put the YAML on Hydra's search path (as a user keeping their code outside the
repository would) and run them: a change to the method or probe seam that breaks the README's recipe
fails here, not in a reader's first hour.
"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.run import execute
from bench.testing import assert_each_rejected, tiny_concept, tiny_sd_pipeline, weights
from tests.conftest import needs_world

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
BLOCK = re.compile(r"```(?:python|yaml)\n(.*?)```", re.S)
PATH = re.compile(r"^# (\S+\.(?:py|yaml))\b", re.M)  # the comment line that names the block's file


def readme_files(heading: str) -> dict[str, str]:
    """``{path: text}`` of the code blocks under the README's ``heading`` (up to the next heading)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    end = re.compile(r"\n##+ ").search(text, start + len(heading) + 2)
    files = {m[1]: body for body in BLOCK.findall(text[start:end.start() if end else None]) if (m := PATH.search(body))}
    assert files, f"no '# <path>' code blocks under {heading!r} in README.md"
    return files


def install(files: dict[str, str], root: Path, monkeypatch) -> None:
    """Write the blocks under ``root``; import every Python one as the module its path names."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
        if path.endswith(".py"):
            name = path.removesuffix(".py").replace("/", ".")
            spec = importlib.util.spec_from_file_location(name, root / path)
            module = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, name, module)
            spec.loader.exec_module(module)


@pytest.fixture
def examples(tmp_path, monkeypatch):
    files = {**readme_files("### Add a method"), **readme_files("### Add a probe")}
    assert {"methods/token_swap.py", "conf/method/token_swap.yaml", "bench/probes/my_probe.py", "conf/probes/my_probe.yaml"} <= set(files)
    install(files, tmp_path / "example", monkeypatch)
    return tmp_path / "example"


def test_the_example_method_edits_only_the_target_words_embeddings(examples):
    from methods.token_swap import unlearn

    pipe = tiny_sd_pipeline()
    before = weights(pipe.text_encoder)
    unet = weights(pipe.unet)
    concept = tiny_concept()
    assert unlearn(pipe, concept, strength=0.0)["nfe"] == 0
    assert all(torch.equal(before[k], v) for k, v in weights(pipe.text_encoder).items())  # its zero setting is the identity
    unlearn(pipe, concept, strength=1.0)
    after = weights(pipe.text_encoder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    (name,) = changed
    assert name.endswith("embeddings.token_embedding.weight"), changed
    rows = (before[name] != after[name]).any(1).nonzero().flatten().tolist()
    assert rows == pipe.tokenizer("star", add_special_tokens=False).input_ids  # the target word's rows, no other
    assert all(torch.equal(unet[k], v) for k, v in weights(pipe.unet).items())
    assert_each_rejected(unlearn, {"strength": 1.5, "stength": 1.0})


@needs_world
def test_the_example_method_and_probe_run_as_one_job(examples, tmp_path):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        cfg = compose(config_name="config", overrides=[
            f"hydra.searchpath=[file://{examples / 'conf'}]", "logger=none", "eval=smoke", "method=token_swap",
            "concept=star", "probes=[partial_diffusion,my_probe]", f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache"])
    assert execute(cfg) == 0
    (record_file,) = (tmp_path / "runs").rglob("record.json")
    record = json.loads(record_file.read_text())
    assert record["method"]["name"] == "token_swap"
    assert record["method"]["changed"] == {"unet": 0, "text_encoder": 1}
    block = record["probes"]["my_probe"]
    assert [point["x"] for point in block["curve"]] == block["axis"]["values"] == [0.0, 0.5, 1.0]
    assert block["metrics"]["recover"]["basis"] == "detection" and block["metrics"]["recover"]["n"] == {"prompts": 1, "seeds": 8}
    assert (record_file.parent / "curve_my_probe.png").exists()


def test_code_outside_the_repository_is_checked_before_any_model_loads(examples):
    """The command line route: the user's package on PYTHONPATH, their YAML on Hydra's search path."""
    (examples / "conf" / "method" / "swap_elsewhere.yaml").write_text(
        (examples / "conf" / "method" / "token_swap.yaml").read_text()
        .replace("name: token_swap", "name: swap_elsewhere").replace("methods.token_swap", "token_swap"))
    (examples / "token_swap.py").write_text((examples / "methods" / "token_swap.py").read_text())
    run = subprocess.run(
        [sys.executable, "-m", "bench", f"hydra.searchpath=[file://{examples / 'conf'}]", "method=swap_elsewhere",
         "method.params.strength=2", "logger=none", f"out_dir={examples}/runs"],
        cwd=ROOT, env={"PYTHONPATH": f"{examples}:{ROOT}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == "error: `method.params.strength` must be float and >= 0 and <= 1, got 2\n"
    assert not (examples / "runs").exists()

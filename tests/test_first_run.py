"""What a newcomer meets: Ctrl-C, progress off a terminal, the end-of-job summary, the shipped gold
record, a busy machine, and wandb runs that end the way the job did."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from bench.run import execute
from tests.conftest import needs_world

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg_with(tmp_path, *overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", "eval=smoke", f"out_dir={tmp_path}/runs",
                                                        f"cache_dir={tmp_path}/cache", *overrides])


def _interrupt_after_first_prompt(base: Path) -> tuple[list[str], dict, subprocess.Popen, str]:
    """Start a smoke job, SIGINT it once λ_U of the first prompt is on disk; return what it did."""
    args = [sys.executable, "-m", "bench", "method=noop", "concept=star", "eval=smoke", "logger=none", "threads=1",
            "eval.max_forget_prompts=2", f"out_dir={base}/runs", f"cache_dir={base}/cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A test run started in the background of a non-interactive shell (`make test &`) inherits SIGINT ignored,
    # and so would the job: give it the disposition a terminal gives, as the user pressing Ctrl-C has.
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((base / "runs").rglob("u-0.safetensors")):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return args, env, p, err


@needs_world
def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path):
    # The rest of a smoke job takes ~15 s after the first prompt; on a loaded machine this process can
    # be descheduled that long and the job finish before the signal lands (exit 0, a full record).
    # That is a lost race, not an answer: try again in a fresh folder, at most three times.
    for attempt in range(3):
        base = tmp_path / f"try{attempt}"
        args, env, p, err = _interrupt_after_first_prompt(base)
        if not (p.returncode == 0 and list((base / "runs").rglob("record.json"))):
            break
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted during ") and last.endswith("re-run the same command to resume"), last
    assert not list((base / "runs").rglob("record.json"))
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed: reused" in r.stdout and "λ_U ×1" in r.stdout  # the finished prompt was reused


class _FakeRun:
    def __init__(self, d: Path):
        self.summary, self.finished, self.dir = {}, None, str(d / "files")

    def finish(self, exit_code: int = 0) -> None:
        self.finished = exit_code


@pytest.mark.parametrize(("outcome", "code"), [("ok", 0), ("failed", 1), ("interrupted", 130)])
def test_wandb_run_ends_the_way_the_job_did(tmp_path, outcome, code):
    from bench.tracking import Tracker

    t = Tracker.__new__(Tracker)
    t.run = _FakeRun(tmp_path / "offline-run-x")
    run = t.run
    t.finish(outcome)
    assert run.finished == code and run.summary["status"] == outcome


def test_bad_input_leaves_no_wandb_run(tmp_path):
    from bench.tracking import Tracker

    folder = tmp_path / "offline-run-20261202-abc"
    (folder / "files").mkdir(parents=True)
    t = Tracker.__new__(Tracker)
    t.run = _FakeRun(folder)
    t.finish("bad_input")
    assert not folder.exists()


def test_progress_off_a_terminal_prints_lines_with_done_total_and_eta(capsys, monkeypatch):
    from bench import progress

    monkeypatch.setenv("CONCEALBENCH_PROGRESS", "lines")
    bar = progress.bar(10, "ESD (esd-x)")
    assert isinstance(bar, progress.Lines)
    bar.interval = 0.0
    bar.t0 -= 5  # five seconds in
    bar.update(4)
    err = capsys.readouterr().err
    assert err.startswith("[progress] ESD (esd-x): 4/10 (40%), 5 s elapsed, ETA 8 s"), err
    monkeypatch.setenv("CONCEALBENCH_PROGRESS", "off")
    assert not isinstance(progress.bar(3, "x"), progress.Lines)


def test_busy_machine_gets_a_warning(monkeypatch, capsys):
    import torch

    from bench import run as R

    monkeypatch.setattr(R.os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    monkeypatch.setattr(R.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    R._warn_if_busy(SimpleNamespace(threads=None))
    err = capsys.readouterr().err
    assert "warning: the machine is already busy (load 1.9 on 2 cores)" in err and "Set threads=1" in err
    R._warn_if_busy(SimpleNamespace(threads=1))  # the user chose: no warning
    assert capsys.readouterr().err == ""


def test_first_run_uses_the_shipped_gold_record(tmp_path, monkeypatch):
    """Without a local retrain record, the gold comparison comes from the published one (same probe protocol and seed)."""
    from bench import run as R
    from leaderboard.samples import record, write

    published = tmp_path / "published"
    gold = record("k-gold", "retrain", recover=0.45)
    write(published, gold)
    monkeypatch.setattr(R, "PUBLISHED", published)
    pd_hash = gold["probes"]["partial_diffusion"]["protocol"]["hash"]
    found = R.find_gold(tmp_path / "runs", "shapes", "star", 0, "partial_diffusion", pd_hash)
    assert found is not None and found["published"] and found["record"]["job_key"] == "k-gold"
    assert R.find_gold(tmp_path / "runs", "shapes", "star", 1, "partial_diffusion", pd_hash) is None  # another seed
    assert R.find_gold(tmp_path / "runs", "shapes", "star", 0, "partial_diffusion", "other") is None  # another protocol
    local = record("k-gold-local", "retrain", recover=0.40)
    write(tmp_path / "runs", local)
    assert R.find_gold(tmp_path / "runs", "shapes", "star", 0, "partial_diffusion", pd_hash)["record"]["job_key"] == "k-gold-local"


@needs_world
def test_summary_names_the_verdict_beside_the_gold_and_ends_with_the_paths(tmp_path, capsys):
    assert execute(cfg_with(tmp_path, "method=retrain", "concept=star")) == 0
    capsys.readouterr()
    assert execute(cfg_with(tmp_path, "method=uce", "concept=star")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    text = "\n".join(out)
    assert "partial diffusion: recovers at ψ" in text and "gold standard: ψ" in text
    assert "verdict: " in text and "erasure " in text and "specificity " in text
    assert out[-2].startswith("  record:  ") and out[-1].startswith("  figures: ")
    rec = json.loads(Path(out[-2].split("record:", 1)[1].strip()).read_text())
    assert rec["probes"]["partial_diffusion"]["gold"]["job_key"]

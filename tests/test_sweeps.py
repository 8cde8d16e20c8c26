"""Every shipped sweep composes, and every one of its points is a valid job config."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from bench.config import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def compose_cfg(*overrides, hydra=False):
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        return compose(config_name="config", overrides=["logger=none", *overrides], return_hydra_config=hydra)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_point_is_a_valid_job(name, tmp_path):
    cfg = compose_cfg(f"+sweep={name}", hydra=True)
    axes = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    assert axes and all(a.startswith("method.params.") for a in axes), axes
    overrides = OverridesParser.create().parse_overrides(axes)
    points = [[]]
    for o in overrides:
        points = [p + [f"{o.key_or_group}={v}"] for p in points for v in o.sweep_string_iterator()]
    assert len(points) >= 6, f"sweep {name} has only {len(points)} points"
    for point in points:
        job = compose_cfg(f"+sweep={name}", f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *point)
        v = validate(job)  # unknown hyperparameter names or bad values fail here, before any training
        for o in point:
            key, value = o.removeprefix("method.params.").split("=", 1)
            assert str(v["params"][key]) == value or float(v["params"][key]) == float(value), (o, v["params"][key])

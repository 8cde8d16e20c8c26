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


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "search").glob("*.yaml")))
def test_optuna_search_composes_and_its_space_is_valid(name, tmp_path):
    cfg = compose_cfg(f"+search={name}", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_.endswith("TPESampler") and sweeper.sampler.seed == 0
    assert sweeper.params and all(k.startswith("method.params.") for k in sweeper.params)
    # the space parses with Hydra's override grammar, and its end points are valid jobs
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    for key, value in sweeper.params.items():
        [o] = OverridesParser.create().parse_overrides([f"{key}={value}"])
        dist = create_optuna_distribution_from_override(o)
        ends = getattr(dist, "choices", None) or (dist.low, dist.high)
        for v in ends:
            v = int(v) if isinstance(v, float) and float(v).is_integer() and "iterations" in key else v
            validate(compose_cfg(f"+search={name}", f"{key}={v}", f"out_dir={tmp_path}/r", f"cache_dir={tmp_path}/c"))


def test_search_value_orders_feasible_infeasible_and_failed():
    from bench.sweep_report import search_value

    def rec(erasure, retention, crs, status="ok"):
        return {"status": status, "metrics": {"erasure": {"value": erasure}, "crs": {"value": crs}},
                "retain": {"retention": {"value": retention}}}

    good, concealing = search_value(rec(0.9, 0.95, 0.5)), search_value(rec(0.9, 0.95, 0.8))
    assert good == pytest.approx(0.9) and concealing == pytest.approx(0.9 - 0.6)
    barely, broken = search_value(rec(1.0, 0.75, 0.5)), search_value(rec(1.0, 0.3, 0.5))
    assert -1.0 > barely > broken  # below the retention floor: worse than any feasible point, still ordered
    assert search_value(rec(0.0, 1.0, 1.0)) >= -1.0 > barely
    assert search_value(rec(1, 1, 0.5, status="failed")) == search_value(None) == -2.0

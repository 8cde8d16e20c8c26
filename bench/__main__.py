"""``python -m bench method=esd concept=star eval=quick`` — one ConcealBench job (Hydra)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the job; return its search value (what the Optuna sweeper maximises, conf/search/)."""
    from hydra.core.hydra_config import HydraConfig

    from bench.run import execute
    from bench.sweep_report import search_value

    code = execute(cfg)
    if code and HydraConfig.get().mode.name != "MULTIRUN":
        sys.exit(code)
    # Under multirun a failed job must not stop the sweep: its failed record is on disk.
    return search_value(_record())


def _record() -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from bench.sweep_report import read_result

    try:
        return read_result(Path(HydraConfig.get().runtime.output_dir))[1]
    except (OSError, ValueError, KeyError):  # no pointer: the job stopped before writing one
        return None


def override_error(overrides: list[str]) -> str | None:
    """Compose the command line's config the way Hydra will; a bad override (an unknown option, a
    misspelled key or hyperparameter, unparsable syntax) becomes one line naming the key, the value
    and what is allowed, instead of Hydra's multi-line report and exit code 1. None when it composes."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        with initialize_config_dir(version_base=None, config_dir=CONF):
            compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        if group:
            options = e.options or sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))
            return f"`{group.replace('/', '.')}` = {name!r} is not one of the options in conf/{group}/: {', '.join(options)}"
        return str(e).splitlines()[0]
    except OverrideParseException as e:
        bad = next((o for o in overrides if _unparsable(o)), None)
        return f"cannot parse the override {bad!r}: {str(e).splitlines()[0]}" if bad else f"cannot parse the overrides: {str(e).splitlines()[0]}"
    except ConfigCompositionException as e:
        m = re.search(r"Could not override '([^']+)'", str(e))
        if m is None:
            return str(e).splitlines()[0]
        key = m.group(1)
        if key.startswith("method.params."):
            return _hyperparameter_error(key, [o for o in overrides if not o.lstrip("+~").startswith(key + "=")])
        return f"`{key}` is not a key of the config (a typo? to add a new key use +{key}=…)"
    return None


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return True
    return False


def _hyperparameter_error(key: str, others: list[str]) -> str:
    """The same message the validator gives for an unknown hyperparameter, listing the method's own."""
    from hydra import compose, initialize_config_dir

    from bench.config import load_target
    from bench.hparams import declared

    try:
        with initialize_config_dir(version_base=None, config_dir=CONF):
            cfg = compose(config_name="config", overrides=others)
        fn = load_target(cfg.method._target_)
        allowed = ", ".join(sorted(declared(fn))) or "none"
        return f"`{key}` is not a hyperparameter of {fn.__module__}; allowed: {allowed}"
    except Exception:  # noqa: BLE001 — the other overrides are bad too: name this key alone
        return f"`{key}` is not a hyperparameter of this method"


def _precheck(argv: list[str]) -> None:
    # Hydra's own flags (--multirun, --cfg, --help, …) and hydra.* overrides are left to Hydra, except
    # the search path: a method or probe whose YAML lives outside conf/ must compose here as it will there.
    if any(a.startswith("-") for a in argv):
        return
    keys = [(a, a.lstrip("+~")) for a in argv]
    overrides = [a for a, k in keys if not k.startswith(("hydra.", "hydra/")) or k.startswith("hydra.searchpath=")]
    err = override_error(overrides)
    if err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _precheck(sys.argv[1:])
    main()

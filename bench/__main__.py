"""``python -m bench method=esd concept=star eval=quick`` — one ConcealBench job (Hydra)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


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
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from bench.sweep_report import read_result

    try:
        return read_result(Path(HydraConfig.get().runtime.output_dir))[1]
    except (OSError, ValueError, KeyError):  # no pointer: the job stopped before writing one
        return None


if __name__ == "__main__":
    main()

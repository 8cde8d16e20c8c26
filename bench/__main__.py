"""``python -m bench method=esd concept=star eval=quick`` — one ConcealBench job (Hydra)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.run import execute

    code = execute(cfg)
    if code:
        # Under multirun a failed job must not stop the sweep: its failed record is on disk.
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name == "MULTIRUN":
            return
        sys.exit(code)


if __name__ == "__main__":
    main()

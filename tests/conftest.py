import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread unless told otherwise (CI sets TEST_THREADS=2): tests share the 2 cores with
# background jobs, and oversubscribed OpenMP threads slow everything down many-fold.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TEST_THREADS", "1"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))

# diffusers and transformers bind a StreamHandler to sys.stderr on first import. Import them here,
# at session start: bound inside a test that captures stderr, the handler would write to a closed
# stream in later tests ("--- Logging error ---").
import diffusers  # noqa: E402,F401
import transformers  # noqa: E402,F401
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")
_transformers_logging.get_logger("transformers")

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "bench" / "world" / "assets" / "shapes"


def world_ready() -> bool:
    return (WORLD / "model_index.json").exists() and (WORLD / "detector" / "model.safetensors").exists()


needs_world = pytest.mark.skipif(not world_ready(), reason="the Shapes world is not built (run `make world`)")


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

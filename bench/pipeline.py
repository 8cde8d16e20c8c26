"""Load pipelines and save/load method weight deltas (safetensors only).

Every world — the shipped Shapes model and Stable Diffusion alike — is a diffusers
``StableDiffusionPipeline`` loaded with ``from_pretrained``; a method's result is stored as
``delta.safetensors``: only the tensors that differ from the base model, with the method, concept,
hyperparameters and base-model hash in the header.

Delta layout (format ``concealbench-delta-v1``; a UNet-only delta is byte-for-byte what it always was):

- UNet tensors under their bare diffusers names (``down_blocks.1.attentions.0...``);
- text-encoder tensors, when a method changed the text encoder (AdvUnlearn), under
  ``text_encoder.`` + their transformers name without its ``text_model.`` level
  (``text_encoder.encoder.layers.0.mlp.fc1.weight``: transformers 5 dropped that level, 4.x has
  it; ``text_encoder_state`` spells names the same under both); no UNet name starts with that
  prefix, so the two never collide;
- header ``base_hash``: ``state_hash`` of the base UNet, as ever (records and deltas already
  published keep matching); ``text_encoder_base_hash``: ``state_hash`` of the base text encoder,
  written, and checked, only when the delta holds text-encoder tensors.

An unlearned model whose text encoder changed is evaluated with *its* text encoder: the harness
pairs the unlearned UNet with it (``pair_text_encoder``) and the sampling engine encodes prompts
with the encoder paired to the UNet it runs (``text_encoder_for``), so θ keeps the original encoder
in the same trajectory where θ* uses the unlearned one (partial diffusion).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.hparams import ConfigError

SHAPES_DIR = Path(__file__).parent / "world" / "assets" / "shapes"
SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler")
DTYPES = ("float32", "float16", "bfloat16")
AUTOCAST = ("float16", "bfloat16")
ATTENTION = ("sdpa", "sliced")


class DeltaError(ValueError):
    """A delta file that is corrupt, foreign, or made for another base model."""


DELTA_FORMAT = json.dumps("concealbench-delta-v1")  # header value marking a delta file (save_delta)
TEXT_ENCODER_PREFIX = "text_encoder."  # delta keys of text-encoder tensors (module docstring)
TEXT_ENCODER_HASH_KEY = "text_encoder_base_hash"  # header key, present iff the delta holds text-encoder tensors
PAIRED_TEXT_ENCODER = "_concealbench_text_encoder"  # where pair_text_encoder keeps a UNet's own text encoder


def model_path(model_cfg: Any) -> str:
    """Local directory or Hub id of the model a config names."""
    if model_cfg.get("path"):
        return str(model_cfg.path)
    if model_cfg.get("world") == "shapes":
        return str(SHAPES_DIR)
    return str(model_cfg.id)


def check_model_path(model_cfg: Any) -> None:
    """Fail early (before loading) when a local model path holds no diffusers pipeline."""
    path = model_cfg.get("path")
    if path is None and model_cfg.get("world") != "shapes":
        return  # a Hub id: checked when loading
    p = Path(model_path(model_cfg))
    key = "model.path" if path else "model (the shipped Shapes world)"
    hint = "" if path else " — run `make world` to rebuild it"
    if not (p / "model_index.json").is_file():
        raise ConfigError(f"`{key}` must be a directory holding a diffusers pipeline (model_index.json), got {str(p)!r}{hint}")
    try:
        index = json.loads((p / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"`{key}`: {str(p / 'model_index.json')!r} is not readable JSON: {e}") from e
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    if model_cfg.get("world") == "shapes":
        parts.append("detector")  # the world's oracle: erasure, retention, specificity and recovery need it
    missing = [k for k in parts if not (p / k).is_dir()]
    if missing:
        raise ConfigError(f"`{key}` = {str(p)!r} names a pipeline but lacks its {', '.join(missing)} folder"
                          f"{'s' if len(missing) > 1 else ''}{hint}")


def check_model_options(model_cfg: Any) -> None:
    """Precision and memory options of ``conf/model/*.yaml`` (absent keys take their defaults)."""
    allowed = {"dtype": DTYPES, "autocast": (None, *AUTOCAST), "attention": (None, *ATTENTION)}
    for key, values in allowed.items():
        v = model_cfg.get(key)
        if key == "dtype" and v is None:
            continue
        if v not in values:
            raise ConfigError(f"`model.{key}` must be one of {', '.join(str(x) for x in values)}, got {v!r}")
    n = model_cfg.get("max_batch_size")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"`model.max_batch_size` must be an integer >= 1 or null, got {n!r}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"`device` must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but no CUDA device is available; use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"`device` is {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..)")
    return dev


def autocast_dtype(model_cfg: Any, device: str | torch.device) -> str | None:
    """The autocast dtype the inference stages run under: ``model.autocast`` on CUDA, else None (fp32).

    Only sampling, the attack and VAE decoding use it; the weights stay in ``model.dtype`` so that
    methods fine-tune fp32 parameters (their reference code trains in fp32).
    """
    if torch.device(device).type != "cuda":
        return None
    return model_cfg.get("autocast") or None


def load_pipeline(model_cfg: Any, device: str | torch.device = "cpu"):
    """``StableDiffusionPipeline.from_pretrained`` with safetensors only and no safety checker."""
    from diffusers import StableDiffusionPipeline

    check_model_path(model_cfg)
    path = model_path(model_cfg)
    dtype = getattr(torch, str(model_cfg.get("dtype") or "float32"))
    kwargs = {"torch_dtype": dtype, "use_safetensors": True, "safety_checker": None, "requires_safety_checker": False}
    if model_cfg.get("revision") and not Path(path).exists():
        kwargs["revision"] = model_cfg.revision
    try:
        with warnings.catch_warnings(), _quiet_loading():
            # diffusers ≥ 0.36 renamed torch_dtype to dtype; the old name works everywhere we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    except OSError as e:
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(
                f"`model.id` {path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it once online or pass model.path=<local diffusers directory>"
            ) from e
        raise ConfigError(f"could not load a diffusers pipeline from `{path}`: {e}") from e
    if model_cfg.get("scheduler"):
        pipe.scheduler = _scheduler(model_cfg.scheduler, pipe.scheduler.config)
    apply_memory_options(pipe, model_cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars: a job's own progress is what a user reads."""
    from diffusers.utils import logging as dlog

    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover
        tlog = None
    dlog.disable_progress_bar()
    if tlog is not None:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        if tlog is not None:
            tlog.enable_progress_bar()


def apply_memory_options(pipe, model_cfg: Any) -> None:
    """``model.attention`` (sdpa = diffusers' default processors | sliced) and ``model.vae_slicing``."""
    if model_cfg.get("attention") == "sliced":
        pipe.enable_attention_slicing()
    if model_cfg.get("vae_slicing"):
        pipe.vae.enable_slicing()  # decode one image at a time: 512² VAE decodes dominate peak memory


def describe_pipeline(pipe, model_cfg: Any, device: str | torch.device) -> dict[str, Any]:
    """What ran, for the record: source, revision, the scheduler in use (class and config), precision."""
    path = model_path(model_cfg)
    local = Path(path).exists()
    return {
        "source": "local" if local else "hub",
        "path": str(Path(path).resolve()) if local else None,
        "revision": None if local else model_cfg.get("revision"),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "autocast": autocast_dtype(model_cfg, device),
        "attention": model_cfg.get("attention") or "sdpa",
        "vae_slicing": bool(model_cfg.get("vae_slicing")),
        "device": str(device),
    }


def _scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"`model.scheduler` must be one of {', '.join(SCHEDULERS)} or null, got {name!r}")
    return getattr(diffusers, name).from_config(config)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes and fp32 bytes of a state dict (first 16 hex digits)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def snapshot_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's parameters and buffers (the base to diff a method against)."""
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def changed_tensors(base: dict[str, torch.Tensor], module: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of ``module`` (or of a state dict) that are not bit-identical to ``base``."""
    out = {}
    state = module if isinstance(module, dict) else module.state_dict()
    for k, v in state.items():
        v = v.detach().to("cpu")
        if k not in base or base[k].shape != v.shape or not torch.equal(base[k], v):
            out[k] = v.contiguous().clone()
    return out


def delta_text_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A text-encoder state dict under the names deltas use: no ``text_model.`` level (module
    docstring), each name after ``prefix`` (``TEXT_ENCODER_PREFIX`` for the keys in the file)."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items()}


def text_encoder_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's state dict under the names deltas use (``delta_text_names``)."""
    return delta_text_names(text_encoder.state_dict())


def save_delta(path: str | Path, base: dict[str, torch.Tensor], unet: torch.nn.Module, metadata: dict[str, Any], *,
               text_encoder_base: dict[str, torch.Tensor] | None = None,
               text_encoder: torch.nn.Module | None = None) -> list[str]:
    """Write the UNet tensors that differ from ``base`` and, given ``text_encoder`` and its
    ``text_encoder_base`` (its ``snapshot_state``), the text-encoder tensors that differ from that
    (module docstring: ``text_encoder.`` names, their own base hash); returns the names written. Atomic."""
    from safetensors.torch import save_file

    if (text_encoder is None) != (text_encoder_base is None):
        raise ValueError("save_delta: `text_encoder` and `text_encoder_base` go together")
    delta = changed_tensors(base, unet)
    meta = {k: json.dumps(v, sort_keys=True, default=str) for k, v in metadata.items()}
    meta["base_hash"] = json.dumps(state_hash(base))
    if text_encoder is not None:
        te_base = delta_text_names(text_encoder_base)
        te = changed_tensors(te_base, text_encoder_state(text_encoder))
        if te:
            delta.update(delta_text_names(te, TEXT_ENCODER_PREFIX))
            meta[TEXT_ENCODER_HASH_KEY] = json.dumps(state_hash(te_base))
    meta["format"] = DELTA_FORMAT
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(delta, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return sorted(delta)


def split_delta(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(UNet tensors, text-encoder tensors under ``text_encoder_state`` names) of a delta or state dict."""
    unet = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    te = {k[len(TEXT_ENCODER_PREFIX):].removeprefix("text_model."): v for k, v in tensors.items() if k.startswith(TEXT_ENCODER_PREFIX)}
    return unet, te


def changed_components(names: list[str]) -> dict[str, int]:
    """How many tensors of each component a delta holds, from its names (``{"unet": n, "text_encoder": m}``)."""
    te = sum(1 for n in names if n.startswith(TEXT_ENCODER_PREFIX))
    return {"unet": len(names) - te, "text_encoder": te}


def delta_names(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sorted(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaError(f"`{path}` is not a readable safetensors file: {e}") from e


def read_safetensors(path: str | Path, label: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw header metadata of a safetensors file, read once; ``DeltaError`` naming
    ``label`` (default: the path) if it is missing, truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    label = label or f"`{path}`"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return load_file(str(path)), raw
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaError(f"{label} is not a readable safetensors file: {e}") from e


def decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    """A delta header's values are JSON (``save_delta``)."""
    return {k: json.loads(v) for k, v in raw.items()}


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a delta file; ``DeltaError`` if it is not one."""
    tensors, raw = read_safetensors(path)
    if raw.get("format") != DELTA_FORMAT:
        raise DeltaError(f"`{path}` is a safetensors file but not a ConcealBench delta (no format=concealbench-delta-v1 in its header)")
    return tensors, decode_meta(raw)


def check_fits(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], label: str, component: str = "UNet",
               prefix: str = "") -> None:
    """``DeltaError`` unless every tensor names a ``component`` tensor of the same shape; the
    message names the first offending tensor as the file spells it (``prefix`` + name)."""
    unknown = [k for k in tensors if k not in own]
    if unknown:
        hint = " (CompVis names: convert the checkpoint to diffusers names first)" if unknown[0].startswith("model.") else ""
        raise DeltaError(f"{label} is foreign to this {component}: {len(unknown)} of {len(tensors)} tensors have no counterpart, "
                         f"first {prefix + unknown[0]!r}{hint}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise DeltaError(f"{label}: tensor {prefix + k!r} has shape {tuple(v.shape)}, this {component}'s is {tuple(own[k].shape)}")


def check_text_encoder(text_encoder: torch.nn.Module | None, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       label: str) -> None:
    """The text-encoder part of a delta (``split_delta``) fits ``text_encoder``: names and shapes,
    then the header's ``text_encoder_base_hash`` when it has one; ``DeltaError`` naming a tensor."""
    if not tensors:
        return
    first = TEXT_ENCODER_PREFIX + sorted(tensors)[0]
    if text_encoder is None:
        raise DeltaError(f"{label} holds {len(tensors)} text-encoder tensors (first {first!r}) but no text encoder was given to load them into")
    own = text_encoder_state(text_encoder)
    check_fits(own, tensors, label, "text encoder", TEXT_ENCODER_PREFIX)
    base = meta.get(TEXT_ENCODER_HASH_KEY)
    if base is not None and base != (mine := state_hash(own)):
        raise DeltaError(f"{label}: its text-encoder tensors (first {first!r}) were made for text encoder {base}, not this one ({mine})")


def load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors (``check_fits``) into ``module`` in place, in its dtype and on its device
    (a text encoder's under ``text_encoder_state`` names or its own)."""
    own = module.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            dst = own[k] if k in own else own[f"text_model.{k}"]  # transformers 4.x keeps the text_model level
            dst.copy_(v.to(dst.dtype))


def attach_modules(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Build the modules a delta adds to the UNet before its tensors are loaded: Receler's eraser
    attention processors (keys ``<attn2>.processor.eraser.*``, ``methods.receler.attach_erasers``),
    the one method whose deployed form is not a change of existing tensors (its GELU eraser cannot
    be folded into them). Imported lazily: no other delta needs it."""
    if any(".processor.eraser." in k for k in tensors):
        from methods.receler import ERASER_KEY, attach_erasers

        attach_erasers(unet, {k: v for k, v in tensors.items() if ERASER_KEY.match(k)})


def checked_parts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any], label: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A delta's or state dict's (UNet, text-encoder) tensors, checked against the modules they will be
    loaded into (names, shapes, the text encoder's base hash), with any module the UNet part adds
    built first (``attach_modules``). Nothing is loaded: the caller checks the UNet's base hash, then
    ``load_tensors`` each part."""
    unet_tensors, te_tensors = split_delta(tensors)
    attach_modules(unet, unet_tensors)
    check_fits(unet.state_dict(), unet_tensors, label)
    check_text_encoder(text_encoder, te_tensors, meta, label)
    return unet_tensors, te_tensors


def apply_delta(unet: torch.nn.Module, path: str | Path, base_hash: str | None = None, *,
                text_encoder: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load a delta into ``unet`` (and its text-encoder tensors into ``text_encoder``) in place,
    checking names, shapes and base-model hashes (the text encoder's only when it has tensors)."""
    tensors, meta = read_delta(path)
    label = f"`{path}`"
    unet_tensors, te_tensors = checked_parts(unet, text_encoder, tensors, meta, label)  # before the UNet's hash: its messages name a tensor
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise DeltaError(f"{label} was made for base model {meta.get('base_hash')}, not this one ({base_hash})")
    load_tensors(unet, unet_tensors)
    if te_tensors:
        load_tensors(text_encoder, te_tensors)
    return meta


# ---------------------------------------------------------------------------- an unlearned UNet's text encoder

def pair_text_encoder(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Make ``text_encoder`` the one that conditions ``unet`` wherever the sampling engine runs it.

    Kept outside the module tree (not a submodule: the UNet's state dict, ``.to`` and parameters
    are unchanged); ``copy.deepcopy`` of the UNet copies the pair along."""
    object.__setattr__(unet, PAIRED_TEXT_ENCODER, text_encoder)


def text_encoder_for(pipe: Any, unet: Any = None) -> Any:
    """The text encoder paired with ``unet`` (``pair_text_encoder``), else the pipeline's own."""
    paired = getattr(unet, "__dict__", {}).get(PAIRED_TEXT_ENCODER) if unet is not None else None
    return paired if paired is not None else pipe.text_encoder


@contextlib.contextmanager
def using_text_encoder(pipe: Any, text_encoder: Any):
    """``pipe.text_encoder`` is ``text_encoder`` inside the block (nothing changes when it already is)."""
    own = pipe.text_encoder
    if text_encoder is None or text_encoder is own:
        yield
        return
    pipe.text_encoder = text_encoder
    try:
        yield
    finally:
        pipe.text_encoder = own

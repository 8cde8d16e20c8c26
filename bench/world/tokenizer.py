"""An offline CLIP BPE tokenizer with exactly SD 1.x token ids.

open_clip ships the BPE merges that Stable Diffusion's tokenizer was built from
(``bpe_simple_vocab_16e6.txt.gz``). We derive ``vocab.json`` and ``merges.txt`` from it the way
OpenAI's CLIP does (256 byte tokens, the same with ``</w>``, one token per merge, then the two
special tokens: 49408 ids), so the Shapes world and the test pipelines tokenize like SD v1.4
without a network. Padding uses ``<|endoftext|>`` (id 49407) as SD 1.x does.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe_file() -> Path:
    import importlib.util

    # Locate open_clip's package directory without importing it (its import pulls in timm/wandb).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip does not ship its BPE vocabulary at {path}")
    return path


def write_clip_tokenizer_files(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs for ``CLIPTokenizer``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return out


def build_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with SD 1.x ids, saved under ``out_dir``."""
    from transformers import CLIPTokenizer

    path = write_clip_tokenizer_files(out_dir, model_max_length)
    return CLIPTokenizer.from_pretrained(str(path))

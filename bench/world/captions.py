"""The Shapes caption grammar: synonyms, paraphrase templates, generic words, and a parser.

Every factor value has a canonical word and paraphrases that do not contain it ("pentagram" for
star, "crimson" for red, "pinstriped" for stripes), so erasure can be probed with prompts the
unlearning method never saw. Generic words ("shape", "object", "coloured", "patterned") name no
factor value and serve as Concept Ablation anchors.

``parse`` maps any prompt back to the factor values it specifies; fidelity and concept detection
use it, so a preset's prompts need no hand-written labels.
"""
from __future__ import annotations

import re

import numpy as np

from bench.world.render import COLOURS, SHAPES, TEXTURES

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round disc"),
    "square": ("square", "box", "square block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "pentagram"),
    "heart": ("heart", "love heart", "valentine"),
    "cross": ("cross", "plus sign", "plus"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "azure", "navy"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "cyan": ("cyan", "turquoise", "aqua"),
}
# Texture adjectives, used as "on a {adj} background".
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid", "blank"),
    "stripes": ("striped", "pinstriped", "lined"),
    "dots": ("dotted", "polka-dot", "spotted"),
    "checker": ("checkered", "checkerboard", "chequered"),
}
GENERIC = {"shape": ("shape", "object"), "colour": ("coloured",), "texture": ("patterned",)}

WORDS = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "texture": TEXTURE_WORDS}
VALUES = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}

TEMPLATES = (
    "{a} {colour} {shape} on {a2} {texture} background",
    "{a} {shape} in {colour}, {texture} background",
    "{a} {colour} {shape} over {a2} {texture} backdrop",
    "{a2} {texture} background with {a} {colour} {shape}",
)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def compose(shape: str | None, colour: str | None, texture: str | None, template: int = 0) -> str:
    """Build a caption from surface words (any may be None = clause left out)."""
    shape_w = shape or "shape"
    if colour is None and texture is None:
        return f"{article(shape_w)} {shape_w}"
    if texture is None:
        return f"{article(colour)} {colour} {shape_w}"
    if colour is None:
        return f"{article(shape_w)} {shape_w} on {article(texture)} {texture} background"
    head = f"{colour} {shape_w}" if template != 1 else shape_w
    t = TEMPLATES[template]
    return t.format(a=article(head), a2=article(texture), colour=colour, shape=shape_w, texture=texture)


def sample_caption(
    shape: int,
    colour: int,
    texture: int,
    rng: np.random.Generator,
    p_empty: float = 0.10,
    p_drop: float = 0.15,
    p_generic: float = 0.05,
) -> str:
    """One training caption for a rendered image, with clause dropout and paraphrase sampling."""
    if rng.random() < p_empty:
        return ""

    def word(factor: str, idx: int, may_drop: bool) -> str | None:
        r = rng.random()
        if may_drop and r < p_drop:
            return None
        if r < p_drop + p_generic and not (factor == "texture" and idx == 0):
            g = GENERIC[factor]
            return g[rng.integers(len(g))]
        syn = WORDS[factor][VALUES[factor][idx]]
        # The canonical word half the time, a paraphrase otherwise.
        return syn[0] if rng.random() < 0.5 else syn[1 + rng.integers(len(syn) - 1)]

    s = word("shape", shape, may_drop=False)
    if s is not None and rng.random() < p_drop:
        s = GENERIC["shape"][rng.integers(2)]
    c = word("colour", colour, may_drop=True)
    t = word("texture", texture, may_drop=True)
    return compose(s, c, t, template=int(rng.integers(len(TEMPLATES))))


def _lexicon() -> list[tuple[str, str, str]]:
    entries = []
    for factor, table in WORDS.items():
        for value, syns in table.items():
            entries += [(w, factor, value) for w in syns]
    # Longest first so "five-pointed star" wins over "star" and "polka-dot" over "dot".
    return sorted(entries, key=lambda e: -len(e[0]))


_LEXICON = _lexicon()


def parse(prompt: str) -> dict[str, str]:
    """Factor values a prompt specifies, e.g. ``{"shape": "star", "colour": "red"}``.

    Raises ``ValueError`` if a prompt names two values of one factor.
    """
    text = " " + re.sub(r"[^a-z\- ]", " ", prompt.lower()) + " "
    found: dict[str, str] = {}
    for word, factor, value in _LEXICON:
        pat = f" {word} "
        while pat in text:
            if factor in found and found[factor] != value:
                raise ValueError(f"prompt {prompt!r} names two {factor}s: {found[factor]} and {value}")
            found[factor] = value
            text = text.replace(pat, " _ ", 1)
    return found


def random_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """Fully specified grammar prompts (shape, colour, texture, random paraphrases), not in ``exclude``."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        s, c, t = (int(rng.integers(len(v))) for v in (SHAPES, COLOURS, TEXTURES))
        pick = lambda f, i: WORDS[f][VALUES[f][i]][int(rng.integers(len(WORDS[f][VALUES[f][i]])))]  # noqa: E731
        p = compose(pick("shape", s), pick("colour", c), pick("texture", t), template=int(rng.integers(len(TEMPLATES))))
        if p not in exclude and p not in out:
            out.append(p)
    return out

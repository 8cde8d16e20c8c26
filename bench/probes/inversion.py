"""The concept-inversion probe: learn a new token embedding against θ* and ask for the concept with it.

Papers: Pham, Marshall, Cohen, Mittal, Hegde, "Circumventing Concept Erasure Methods for
Text-to-Image Generative Models" (ICLR 2024, "Concept Inversion", CCE); the TextualInversionProbe
of Lu et al., "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025). Both run textual
inversion (Gal et al. 2022; diffusers ``examples/textual_inversion/textual_inversion.py``) on the
*erased* model: only one new token embedding is trained, the text encoder and UNet stay frozen,
and the learned token replaces the concept word in the evaluation prompts.

Reference implementations and their defaults:
- NYU-DICE-Lab/circumventing-concept-erasure, commit 3b750f1, ``esd/train.sh``: 25 training images,
  batch 4 × gradient accumulation 4, lr 5e-3 scaled by the effective batch, constant, 5000 steps,
  initializer token "art" (styles) / the concept word ("nude").
- kevinlu4588/WhenAreConceptsErased, commit 9a03e07, ``src/probes/textual_inversion_probe.py``:
  images of the base model, batch 1 × accumulation 4, lr 5e-4 scaled (×4), constant, 3000 steps,
  initializer "object". ``conf/probes/inversion.yaml``'s SD values follow this one.

The recovery curve: the embedding is checkpointed at ``checkpoints`` (inversion steps; 0 = the
initial embedding), and at each the unlearned model generates every forget prompt with the concept
word replaced by the learned token. The recovery point is the number of inversion steps at which
concept detection reaches 0.5. The gold standard and θ run the same probe: how fast textual
inversion teaches the concept to a model that never knew it is the control.

Deliberate deviations (every one):
1. ``init: concept`` (default) starts from the concept word's own embedding (the mean of its token
   embeddings): step 0 is then the plain forget prompt, so θ recovers at once and the axis measures
   how far from the word the concept hides. ``init: anchor`` starts from the preset's generic anchor
   word ("shape"), like the references' neutral initializers.
2. The Shapes world trains on renders of the concept (the attacker holds real examples) with the
   world grammar's one-clause captions; SD uses the diffusers object/style templates.
3. Fixed-size batches of the K images (with replacement), no gradient accumulation; AdamW with the
   diffusers defaults (β 0.9/0.999, weight decay 1e-2) on the single vector; constant learning
   rate (no ``scale_lr``: the rate given is the rate used).
4. Seeded: images, timesteps and noise come from generators seeded by the job seed.
5. A several-concept preset (``star_heart``) learns one token per target word.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import torch

from bench.hparams import ConfigError
from bench.probes import Axis, Probe, ProbeContext, ProbeOutput, Workload
from bench.probes import _fewshot as F

SEED_OFFSET = 200_000


class ConceptInversion(Probe):
    """``probes=[inversion]`` (conf/probes/inversion.yaml)."""

    classes = ("forget",)
    display = "concept inversion"
    reference = "Pham et al., ICLR 2024 (CCE); Lu et al., NeurIPS 2025"

    def __init__(self, checkpoints: list[int] = (0, 25, 50, 100, 200, 300), images: int = 8, batch_size: int = 8,
                 lr: float = 0.02, init: str = "concept", placeholder: str = "<concealbench-{i}>", seeds: int = 8):
        steps = F.check_settings(self, checkpoints, images, batch_size, lr, seeds)
        if init not in ("concept", "anchor"):
            raise ConfigError(f"`{self.key('init')}` must be one of concept, anchor, got {init!r}")
        if not isinstance(placeholder, str) or not placeholder.strip() or "{i}" not in placeholder or " " in placeholder:
            raise ConfigError(f"`{self.key('placeholder')}` must be a non-empty token without spaces containing {{i}} "
                              f"(one placeholder per target word), got {placeholder!r}")
        self.checkpoints, self.images, self.batch_size, self.lr = steps, images, batch_size, float(lr)
        self.init, self.placeholder, self.seeds = init, placeholder, seeds

    def check_world(self, concept: Any, world: str) -> None:
        F.check_images_available(self, concept, world)
        if self.init == "anchor" and not (concept.anchor or "").strip():
            raise ConfigError(f"`{self.key('init')}` = 'anchor' needs `concept.anchor`, which is empty for {concept.name!r}")

    def describe(self) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "images": self.images, "batch_size": self.batch_size, "lr": self.lr,
                "init": self.init, "seeds": self.seeds}

    def axis(self, ctx: ProbeContext) -> Axis:
        return Axis("inversion_steps", "inversion steps (new token embedding learned against θ*)", tuple(float(s) for s in self.checkpoints),
                    "steps")

    # --------------------------------------------------------------------------- the token
    def tokens(self, ctx: ProbeContext) -> list[str]:
        names = [self.placeholder.format(i=i) for i in range(len(ctx.concept.targets or (ctx.concept.target,)))]
        self.check_tokenizer(ctx.pipe.tokenizer, len(names))
        return names

    def check_tokenizer(self, tokenizer: Any, n: int = 1) -> None:
        """The placeholder must be a string the tokenizer does not know (else it would mean something already)."""
        for i in range(n):
            t = self.placeholder.format(i=i)
            if t in _ADDED:
                continue
            if t in tokenizer.get_vocab() or len(tokenizer(t, add_special_tokens=False).input_ids) == 1:
                raise ConfigError(f"`{self.key('placeholder')}` = {self.placeholder!r} gives {t!r}, a token the tokenizer already "
                                  "knows: use a string it does not, with {i} for the target's index (e.g. <concealbench-{i}>)")

    def _init_vectors(self, ctx: ProbeContext) -> torch.Tensor:
        table = ctx.pipe.text_encoder.get_input_embeddings().weight.detach()
        words = list(ctx.concept.targets or (ctx.concept.target,)) if self.init == "concept" else [ctx.concept.anchor] * len(ctx.concept.targets or (1,))
        vecs = []
        for w in words:
            ids = ctx.pipe.tokenizer(w, add_special_tokens=False).input_ids
            vecs.append(table[ids].mean(0))
        return torch.stack(vecs).clone()

    def prompt_with_tokens(self, ctx: ProbeContext, prompt: str, tokens: list[str]) -> str:
        return substitute(prompt, ctx.concept, tokens, ctx.world)

    def rows(self, w: Workload) -> dict[str, int]:
        return {"sample": w.sample(w.forget * len(self.checkpoints) * self.seeds), "train": 2 * self.checkpoints[-1] * self.batch_size,
                "theta": 0 if w.renders else w.sample(self.images)}

    # --------------------------------------------------------------------------- prepare: learn the embedding
    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, Any], dict[str, Any]]:
        tokens = self.tokens(ctx)
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 17)
        groups = F.concept_images(ctx, self.images, ctx.seed * 1000 + SEED_OFFSET)
        lat = [F.encode(ctx.pipe, imgs) for imgs, _ in groups]
        temps = F.templates(ctx.world, ctx.concept.kind)
        sched = F.train_scheduler(ctx.pipe)
        vec = torch.nn.Parameter(self._init_vectors(ctx).to(ctx.device))
        opt = torch.optim.AdamW([vec], lr=self.lr, betas=(0.9, 0.999), weight_decay=1e-2)
        saved = {}

        def keep(step: int) -> None:
            if step in self.checkpoints:
                saved[f"embeds/{step}"] = vec.detach().cpu().clone()

        with _restore_grads(ctx), placeholders(ctx.pipe, tokens, vec):
            keep(0)
            history, rows = F.fit(ctx.pipe, ctx.star, sched, opt, lat, [tokens[i] for _, i in groups], temps, g,
                                  steps=self.checkpoints[-1], batch_size=self.batch_size, text_grad=True,
                                  desc="concept inversion", on_step=keep)
        ctx.counter.add(rows * 2, "probe_train")  # one forward and one backward pass per row (NFE-equivalents)
        meta = {"tokens": tokens, "loss": F.loss_trace(history), "train_rows": rows,
                "init_words": list(ctx.concept.targets) if self.init == "concept" else [ctx.concept.anchor]}
        return saved, meta

    # --------------------------------------------------------------------------- run: generate with the learned token
    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        tensors, meta = state
        tokens = meta["tokens"]
        text = self.prompt_with_tokens(ctx, prompt, tokens)
        seeds = ctx.seeds(SEED_OFFSET, self.seeds)
        images = {}
        before = ctx.counter.total
        for step in self.checkpoints:
            vec = tensors[f"embeds/{step}"].to(ctx.device)
            with placeholders(ctx.pipe, tokens, vec), torch.no_grad():
                images[float(step)] = ctx.images(ctx.star, text, seeds)
        return ProbeOutput(images=images, meta={"nfe": ctx.counter.total - before, "nfe_shared": 0}, data={"prompt": text})


_ADDED: set[str] = set()  # placeholder strings this process added to a tokenizer (they are ours, not "known")


def substitute(prompt: str, concept: Any, tokens: list[str], world: str) -> str:
    """The prompt with each target word (and the paraphrases that mean it) replaced by its token."""
    targets = list(concept.targets or (concept.target,))
    words = [(w, targets.index(w)) for w in targets]
    for syn in getattr(concept, "synonyms", ()) or ():
        words.append((syn, _target_of(syn, targets, world)))
    out = prompt
    for w, j in sorted(words, key=lambda e: -len(e[0])):
        out = re.sub(rf"(?i)(?<![\w-]){re.escape(w)}(?![\w-])", tokens[j], out)
    return out


def _target_of(word: str, targets: list[str], world: str) -> int:
    for j, t in enumerate(targets):
        if re.search(rf"(?i)\b{re.escape(t)}\b", word):
            return j
    if world == "shapes" and len(targets) > 1:
        from bench.world.captions import parse

        value = parse(word)
        for j, t in enumerate(targets):
            if value and parse(t) == value:
                return j
    return 0


@contextmanager
def placeholders(pipe: Any, tokens: list[str], vectors: torch.Tensor):
    """While active, the tokenizer knows ``tokens`` and the text encoder reads ``vectors[i]`` for
    token i (a forward pre-hook maps their ids to a valid row, a forward hook substitutes the
    vectors — gradients flow into them). The embedding table itself is never changed."""
    tok = pipe.tokenizer
    missing = [t for t in tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)  # a new string only: prompts without it tokenize as before
        _ADDED.update(missing)
    ids = torch.tensor([tok.convert_tokens_to_ids(t) for t in tokens])
    emb = pipe.text_encoder.get_input_embeddings()
    state: dict[str, torch.Tensor] = {}

    def pre(module, args):
        x = args[0]
        hit = (x.unsqueeze(-1) == ids.to(x.device)).to(torch.long)  # (..., n_tokens)
        state["hit"] = hit
        return (torch.where(hit.sum(-1) > 0, torch.zeros_like(x), x),)

    def post(module, args, out):
        hit = state.pop("hit", None)
        if hit is None or not hit.any():
            return out
        sub = torch.einsum("...k,kd->...d", hit.to(out.dtype), vectors.to(out.dtype))
        return torch.where(hit.sum(-1, keepdim=True) > 0, sub, out)

    h1, h2 = emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


@contextmanager
def _restore_grads(ctx: ProbeContext):
    mods = (ctx.star, ctx.pipe.text_encoder, ctx.pipe.vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in mods]
    for m in mods:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, fl in zip(mods, flags, strict=True):
            for p, f in zip(m.parameters(), fl, strict=True):
                p.requires_grad_(f)
                p.grad = None


__all__ = ["ConceptInversion", "placeholders", "substitute"]

"""Prompt strategies for text-to-image calibration data, written as a JSONL manifest.

Strategies (each row records every class it names, so labels stay known):
  * ``single``   — "a photo of a {cls}";
  * ``template`` — GenQ-style "a {adj} photo of a {adj2} {cls}" with :data:`ADJECTIVES`;
  * ``learned``  — one class per image, generated from learned multi-mode prompt embeddings
                   (:mod:`dfquant.generate.learned`); the row keeps "a photo of a {cls}" as its text;
  * ``mixup``    — mixup-class prompting (arXiv 2507.21947): k labels joined by "and",
                   "a photo of a {c1} and a {c2}"; pairing ``random`` (the paper's default and
                   best), ``similar`` or ``dissimilar`` by the generator's text-embedding cosine.
Class coverage is balanced over N images (every class appears floor/ceil(N*k/C) times) and
the manifest is a pure function of its arguments and seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dfquant.errors import DfqError
from dfquant.io import write_text

# Photographic qualifiers in the spirit of GenQ's templates; the first word goes before
# "photo", the second before the class name.
ADJECTIVES: tuple[str, ...] = (
    "bright", "dark", "clean", "blurry", "close-up", "cropped", "large", "small",
    "detailed", "simple", "centered", "high-contrast", "low-contrast", "plain", "good", "real",
)
STRATEGIES = ("single", "template", "mixup", "learned")
PAIRINGS = ("random", "similar", "dissimilar")


@dataclass
class PromptRow:
    index: int
    prompt: str
    classes: list[int]
    class_names: list[str]
    seed: int
    strategy: str


def image_seed(seed: int, index: int) -> int:
    """Per-image seed from the run seed and the image's global index (worker-count independent)."""
    return (seed * 1_000_003 + index * 7919 + 12345) % (2**31 - 1)


def _balanced(num_classes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    reps = -(-count // num_classes)
    slots = np.concatenate([rng.permutation(num_classes) for _ in range(reps)])[:count]
    return slots


def _random_groups(num_classes: int, n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """n groups of k distinct classes with balanced class counts."""
    slots = _balanced(num_classes, n * k, rng).reshape(n, k) if num_classes >= k else None
    if slots is None:
        raise DfqError(f"mixup with k={k} needs at least {k} classes; lower --k")
    groups = [list(map(int, g)) for g in slots]
    # repair repeated classes inside a group by swapping with another group's slot
    for i, g in enumerate(groups):
        for j in range(k):
            tries = 0
            while g.count(g[j]) > 1 and tries < 1000:
                o = int(rng.integers(n)); p = int(rng.integers(k))
                other = groups[o]
                if other[p] not in g and g[j] not in [c for q, c in enumerate(other) if q != p]:
                    g[j], other[p] = other[p], g[j]
                tries += 1
    return groups


def _ranked_groups(sim: np.ndarray, n: int, k: int, similar: bool, rng: np.random.Generator) -> list[list[int]]:
    """Primary class balanced; partners drawn from the 3 most (dis)similar classes."""
    num_classes = sim.shape[0]
    primaries = _balanced(num_classes, n, rng)
    groups = []
    for c in primaries:
        order = [int(j) for j in np.argsort(-sim[c] if similar else sim[c]) if j != c]
        pool = order[: max(k - 1, min(3, len(order)))]
        groups.append([int(c)] + [int(x) for x in rng.choice(pool, size=k - 1, replace=False)])
    return groups


def class_similarity(class_names: Sequence[str], tokenizer, text_encoder) -> np.ndarray:
    """Cosine similarity of the generator's text embeddings of "a photo of a {cls}": CLIP's pooled
    output where the encoder has one (SD, SDXL, Flux's CLIP), else its projected text embedding
    (SD3), else the mean of the last hidden states over real tokens (T5, Gemma, Qwen)."""
    with torch.no_grad():
        enc = tokenizer([f"a photo of a {c}" for c in class_names], padding="max_length", truncation=True,
                        max_length=min(tokenizer.model_max_length, 512), return_tensors="pt")
        out = text_encoder(enc.input_ids.to(text_encoder.device), output_hidden_states=True)
        emb = getattr(out, "pooler_output", None)
        emb = emb if emb is not None else getattr(out, "text_embeds", None)
        if emb is None:
            mask = enc.attention_mask.to(out.hidden_states[-1].device).unsqueeze(-1).to(out.hidden_states[-1].dtype)
            emb = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
    return (emb @ emb.T).numpy()


def mixup_prompt(class_names: Sequence[str]) -> str:
    """The mixup-class wording: "a photo of a kite and a vulture" (any number of classes)."""
    return "a photo of " + " and ".join(f"a {c}" for c in class_names)


def make_manifest(class_names: Sequence[str], n: int, strategy: str = "mixup", k: int = 2, pairing: str = "random",
                  seed: int = 0, similarity: np.ndarray | None = None) -> list[PromptRow]:
    """Build ``n`` prompt rows for ``strategy`` (see module docstring)."""
    if strategy not in STRATEGIES:
        raise DfqError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if pairing not in PAIRINGS:
        raise DfqError(f"unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
    if n < 1:
        raise DfqError("--n must be at least 1")
    names = list(class_names)
    rng = np.random.Generator(np.random.PCG64(seed))
    if strategy == "mixup":
        if k < 2:
            raise DfqError("mixup needs --k >= 2 (k=1 is the single strategy)")
        if pairing == "random":
            groups = _random_groups(len(names), n, k, rng)
        else:
            if similarity is None:
                raise DfqError(f"pairing={pairing} needs the generator's text encoder; pass --generator")
            groups = _ranked_groups(similarity, n, k, pairing == "similar", rng)
    else:
        groups = [[int(c)] for c in _balanced(len(names), n, rng)]
    rows = []
    for i, g in enumerate(groups):
        cls = [names[c] for c in g]
        if strategy in ("single", "learned"):  # learned: the text its embedding starts from
            prompt = f"a photo of a {cls[0]}"
        elif strategy == "template":
            a1, a2 = rng.choice(len(ADJECTIVES), size=2, replace=False)
            prompt = f"a {ADJECTIVES[a1]} photo of a {ADJECTIVES[a2]} {cls[0]}"
        else:
            prompt = mixup_prompt(cls)
        rows.append(PromptRow(i, prompt, g, cls, image_seed(seed, i), strategy if strategy != "mixup" else f"mixup-{pairing}-k{k}"))
    return rows


def write_manifest(rows: Sequence[PromptRow], path: str | Path) -> None:
    write_text(path, "".join(json.dumps(asdict(r)) + "\n" for r in rows))


def read_manifest(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise DfqError(f"manifest {path} not found; create one with `dfq prompts`")
    keys = set(PromptRow.__dataclass_fields__)
    try:  # generated-image manifests carry extra keys (file, generator, settings)
        return [PromptRow(**{k: v for k, v in json.loads(line).items() if k in keys})
                for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise DfqError(f"{path} is not a dfq prompt manifest ({exc}); recreate it with `dfq prompts`") from None

"""A CLIP byte-level BPE tokenizer built from the project's own caption vocabulary.

CLIP's tokenizer needs a vocab.json/merges.txt pair whose merges only produce tokens in
the vocab. We learn merges on the caption words (greedy most-frequent-pair BPE until
every caption word is one token) on top of the full 256-symbol byte alphabet, so any
other text still tokenizes, character by character.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from transformers import CLIPTokenizer

_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _byte_alphabet() -> list[str]:
    """The reversible byte -> printable-unicode table used by GPT-2/CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def learn_bpe(texts: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) under which every word of ``texts`` is a single token."""
    words = Counter(w for t in texts for w in _WORD.findall(t.lower()))
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        vocab_list.append(merged)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}, merges


def build_tokenizer(texts: Iterable[str]) -> CLIPTokenizer:
    """A CLIPTokenizer (max length 77, as SD's) whose vocabulary covers ``texts``."""
    vocab, merges = learn_bpe(texts)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

"""Prompt manifests and the offline tokenizer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from dfquant.cli import app
from dfquant.data.fmnist import CLASS_NAMES
from dfquant.errors import DfqError
from dfquant.prompts import ADJECTIVES, make_manifest, read_manifest, write_manifest

NAMES = list(CLASS_NAMES)


def test_manifest_count_and_indices():
    rows = make_manifest(NAMES, 37, "mixup", k=2, seed=0)
    assert len(rows) == 37
    assert [r.index for r in rows] == list(range(37))
    assert len({r.seed for r in rows}) == 37  # every image gets its own latent seed


@pytest.mark.parametrize("strategy,k,n", [("single", 1, 103), ("template", 1, 64), ("mixup", 2, 101), ("mixup", 3, 57)])
def test_class_balance(strategy, k, n):
    rows = make_manifest(NAMES, n, strategy, k=k, seed=3)
    counts = Counter(c for r in rows for c in r.classes)
    target = n * k / len(NAMES)
    assert set(counts) == set(range(len(NAMES)))
    assert all(abs(c - target) <= 1 for c in counts.values()), counts


def test_deterministic_per_seed_and_different_across_seeds():
    a = make_manifest(NAMES, 50, "mixup", seed=1)
    assert a == make_manifest(NAMES, 50, "mixup", seed=1)
    b = make_manifest(NAMES, 50, "mixup", seed=2)
    assert [r.prompt for r in a] != [r.prompt for r in b]
    assert [r.seed for r in a] != [r.seed for r in b]


@pytest.mark.parametrize("k", [2, 3])
def test_mixup_rows_have_k_distinct_labels(k):
    for r in make_manifest(NAMES, 80, "mixup", k=k, seed=0):
        assert len(r.classes) == k and len(set(r.classes)) == k
        assert r.class_names == [NAMES[c] for c in r.classes]
        assert r.prompt == "a photo of " + " and ".join(f"a {c}" for c in r.class_names)
        assert r.strategy == f"mixup-random-k{k}"


def test_template_adjectives():
    pattern = re.compile(r"^a (\S+) photo of a (\S+) (.+)$")
    for r in make_manifest(NAMES, 40, "template", seed=0):
        m = pattern.match(r.prompt)
        assert m, r.prompt
        assert m.group(1) in ADJECTIVES and m.group(2) in ADJECTIVES and m.group(1) != m.group(2)
        assert m.group(3) == r.class_names[0]


def test_ranked_pairing_uses_similarity():
    sim = np.eye(len(NAMES))
    sim[0, 1] = sim[1, 0] = 0.9  # class 1 is the one most like class 0
    rows = make_manifest(NAMES, 30, "mixup", pairing="similar", seed=0, similarity=sim)
    assert all(r.strategy == "mixup-similar-k2" and len(set(r.classes)) == 2 for r in rows)
    assert all(r.classes[1] in (1, 2, 3) for r in rows if r.classes[0] == 0)  # top-3 pool, 1 first
    with pytest.raises(DfqError, match="--generator"):
        make_manifest(NAMES, 10, "mixup", pairing="dissimilar")


@pytest.mark.parametrize("kwargs", [dict(strategy="bad"), dict(pairing="nearest"), dict(k=1), dict(n=0)])
def test_bad_arguments_raise(kwargs):
    args = dict(class_names=NAMES, n=10, strategy="mixup") | kwargs
    with pytest.raises(DfqError):
        make_manifest(**args)


def test_manifest_roundtrip(tmp_path):
    rows = make_manifest(NAMES, 12, "template", seed=5)
    write_manifest(rows, tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == rows
    with pytest.raises(DfqError, match="dfq prompts"):
        read_manifest(tmp_path / "missing.jsonl")


def test_offline_tokenizer_single_token_classes():
    from dfquant.generate.mini import tokenizer_corpus
    from dfquant.generate.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_corpus())
    assert tok.model_max_length == 77
    for name in NAMES:
        for word in re.findall(r"[a-z]+|[^\sa-z0-9]+", name):  # "t-shirt" is t, -, shirt as in CLIP
            assert len(tok.tokenize(word)) == 1, (name, word, tok.tokenize(word))
    assert len(tok.tokenize("zebra")) > 1  # unseen words still tokenize (byte fallback), no <unk>
    ids = tok("a photo of a bag", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77


def test_cli_prompts_writes_manifest(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n\nbird\n")
    out = tmp_path / "m.jsonl"
    res = CliRunner().invoke(app, ["prompts", "--classes", str(names), "--n", "9", "--strategy", "mixup", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = read_manifest(out)
    assert len(rows) == 9 and {n for r in rows for n in r.class_names} == {"cat", "dog", "bird"}


def test_cli_bad_strategy_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dfquant.cli", "prompts", "--strategy", "bad", "--out", str(tmp_path / "m.jsonl")],
                          capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown strategy 'bad'"), proc.stderr
    assert not (tmp_path / "m.jsonl").exists()

import numpy as np
import pytest
import torch
from PIL import Image

from dfquant.errors import DfqError
from dfquant.generate.learned import base_embeddings, learn_prompts, rows_embeddings
from dfquant.generate.mini import build_pipeline
from dfquant.generate.pipeline import generate
from dfquant.prompts import make_manifest


def _pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_learned_embeddings_change_images_deterministically(resnet20, tmp_path):
    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    embeds = learn_prompts(pipe, resnet20, modes=2, iters=3, steps=2, batch_classes=2, lr=0.5, progress=False)
    assert embeds.shape[:2] == (10, 2) and torch.isfinite(embeds).all()
    base = base_embeddings(pipe, resnet20.class_names)
    assert not torch.allclose(embeds[:, 0], base) and not torch.allclose(embeds[:, 0], embeds[:, 1])
    rows = make_manifest(resnet20.class_names, 4, "learned", seed=0)
    assert rows[0].strategy == "learned" and rows[0].prompt.startswith("a photo of a ")
    kw = dict(steps=2, guidance=3.5, height=32, width=32, batch_size=4, progress=False)
    learned = rows_embeddings(rows, embeds)
    plain = torch.stack([base[r.classes[0]] for r in rows])
    generate(rows, pipe, tmp_path / "a", prompt_embeds=learned, **kw)
    generate(rows, pipe, tmp_path / "b", prompt_embeds=learned, **kw)
    generate(rows, pipe, tmp_path / "c", prompt_embeds=plain, **kw)
    a, b, c = _pngs(tmp_path / "a"), _pngs(tmp_path / "b"), _pngs(tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))          # same seed, same embeddings -> same pixels
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))      # learned embeddings change the images


def test_modes_cycle_per_class():
    rows = make_manifest([f"c{i}" for i in range(3)], 9, "learned", seed=1)
    embeds = torch.arange(3 * 2).float().view(3, 2, 1, 1).expand(3, 2, 2, 2)
    per_row = rows_embeddings(rows, embeds)
    for c in range(3):
        modes = [int(per_row[i, 0, 0]) % 2 for i, r in enumerate(rows) if r.classes[0] == c]
        assert modes == [0, 1, 0]


def test_learn_prompts_needs_two_modes(resnet20):
    with pytest.raises(DfqError, match="modes"):
        learn_prompts(build_pipeline("tiny"), resnet20, modes=1, iters=1)

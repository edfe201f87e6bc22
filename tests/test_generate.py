"""Generation with a tiny random-weight SD pipeline: files, resume, settings pinning, scale-out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfquant.cli import app
from dfquant.data.fmnist import CLASS_NAMES
from dfquant.errors import DfqError
from dfquant.generate import pipeline as gp
from dfquant.generate.grid import contact_sheets
from dfquant.prompts import make_manifest, write_manifest

SMALL = dict(steps=2, guidance=3.5, height=32, width=32, generator_id="tiny")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from dfquant.generate.mini import build_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_pipeline("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return gp.load_pipeline(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def rows():
    return make_manifest(list(CLASS_NAMES), 4, "mixup", seed=0)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))])


def test_generate_end_to_end(pipe, rows, tmp_path):
    manifest = gp.generate(rows, pipe, tmp_path, batch_size=2, progress=False, **SMALL)
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(d["index"], d["prompt"], d["classes"], d["seed"]) for d in lines] == [(r.index, r.prompt, r.classes, r.seed) for r in rows]
    assert all(d["generator"] == "tiny" and d["settings"]["steps"] == 2 and d["strategy"] == "mixup-random-k2" for d in lines)
    assert json.loads((tmp_path / "settings.json").read_text())["scheduler"] == "DDIMScheduler"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_resume_is_byte_identical(pipe, rows, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    gp.generate(rows, pipe, whole, batch_size=2, progress=False, **SMALL)
    gp.generate(rows[:2], pipe, resumed, batch_size=2, progress=False, **SMALL)  # "killed" after two images
    (resumed / "manifest.jsonl").unlink()
    (resumed / ".000002.png.x1y2.tmp").write_bytes(b"\x89PNG truncated")  # what a kill mid-write leaves
    first = (resumed / "000000.png").stat().st_mtime_ns
    gp.generate(rows, pipe, resumed, batch_size=2, progress=False, **SMALL)
    assert (resumed / "000000.png").stat().st_mtime_ns == first  # finished images are skipped, not redone
    assert files(resumed) == files(whole)


def test_independent_of_batch_size(pipe, rows, tmp_path):
    gp.generate(rows, pipe, tmp_path / "b1", batch_size=1, progress=False, **SMALL)
    gp.generate(rows, pipe, tmp_path / "b4", batch_size=4, progress=False, **SMALL)
    # same seeded latents per row; batched matmuls may differ in the last float bit only
    assert np.abs(pixels(tmp_path / "b1") - pixels(tmp_path / "b4")).max() <= 1


def test_prompt_embeds_hook_matches_text(pipe, rows, tmp_path):
    ids = pipe.tokenizer([r.prompt for r in rows], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    gp.generate(rows, pipe, tmp_path / "text", batch_size=4, progress=False, **SMALL)
    gp.generate(rows, pipe, tmp_path / "emb", batch_size=4, progress=False, prompt_embeds=embeds, **SMALL)
    assert np.abs(pixels(tmp_path / "text") - pixels(tmp_path / "emb")).max() <= 1
    assert json.loads((tmp_path / "emb" / "settings.json").read_text())["prompt_embeds"] is True


def test_changed_settings_refused(pipe, rows, tmp_path):
    gp.generate(rows[:1], pipe, tmp_path, batch_size=1, progress=False, **SMALL)
    with pytest.raises(DfqError, match="steps: 2 -> 3.*new --out"):
        gp.generate(rows, pipe, tmp_path, batch_size=1, progress=False, **(SMALL | {"steps": 3}))
    (tmp_path / "settings.json").unlink()
    with pytest.raises(DfqError, match="new --out"):
        gp.generate(rows, pipe, tmp_path, batch_size=1, progress=False, **SMALL)


def test_load_pipeline_options_and_errors(tiny_dir, tmp_path, monkeypatch):
    for name, cls in gp.SCHEDULERS.items():
        assert type(gp.load_pipeline(str(tiny_dir), scheduler=name).scheduler).__name__ == cls
    with pytest.raises(DfqError, match="scheduler"):
        gp.load_pipeline(str(tiny_dir), scheduler="heun")
    with pytest.raises(DfqError, match="dtype"):
        gp.load_pipeline(str(tiny_dir), dtype="int8")
    monkeypatch.setattr(gp, "mini_generator_dir", lambda name="mini": tmp_path / "absent" / name)
    with pytest.raises(DfqError, match="dfq train-generator`"):
        gp.load_pipeline("mini")
    with pytest.raises(DfqError, match="mini-compose generator is not trained yet .* `dfq train-generator --compose 0.33`"):
        gp.load_pipeline("mini-compose")
    assert gp.preset_for("mini-compose") == gp.PRESETS["mini"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DfqError, match="not in the Hugging Face cache; run `hf download dfquant-test/not-cached`"):
        gp.load_pipeline("dfquant-test/not-cached")
    assert gp.preset_for("stabilityai/sd-turbo")["guidance"] == 0.0 and gp.preset_for("sd15")["steps"] == 50
    assert gp.preset_for(str(tiny_dir))["size"] is None  # a folder uses its UNet's native size


def test_euler_ancestral_is_seeded_per_image(tiny_dir, rows, tmp_path):
    pipe = gp.load_pipeline(str(tiny_dir), scheduler="euler-a")
    gp.generate(rows[:2], pipe, tmp_path / "a", batch_size=2, progress=False, **SMALL)
    torch.manual_seed(123)  # the global RNG must not matter: sampler noise comes from the row's generator
    gp.generate(rows[:2], pipe, tmp_path / "b", batch_size=1, progress=False, **SMALL)
    assert np.abs(pixels(tmp_path / "a") - pixels(tmp_path / "b")).max() <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_match_one(tiny_dir, rows, tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(rows, manifest)
    args = ["generate", str(manifest), "--generator", str(tiny_dir), "--steps", "2", "--batch-size", "2", "--threads", "1",
            "--device", "cpu"]
    # the one-process reference runs the same command in this process (as tests/test_families.py does): an interpreter
    # start-up with torch and diffusers fewer; --threads 1 sets this process's torch threads, restored after
    threads = torch.get_num_threads()
    try:
        one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, (one.output, one.exception)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, "-m", "dfquant.cli", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**ENV, "DFQ_PROGRESS": "1"}, timeout=300)  # bars on, off a terminal: they name the workers
    assert two.returncode == 0, two.stderr[-2000:]
    assert "generate[1/2]" in two.stderr  # really two workers
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert len(list((tmp_path / "one").glob("*.png"))) == 4
    with Image.open(tmp_path / "one" / "000000.png") as im:
        assert im.size == (32, 32)  # a folder generator defaults to its native resolution


def test_grid_one_sheet_per_strategy(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i, strategy in enumerate(["single", "mixup-random-k2", "single"]):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i:06d}.png")
        lines.append(json.dumps({"index": i, "file": f"{i:06d}.png", "prompt": f"a photo of a thing number {i}", "strategy": strategy}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["grid", str(folder)])
    assert res.exit_code == 0, res.output
    sheets = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in sheets] == ["imgs_grid_mixup-random-k2.png", "imgs_grid_single.png"]
    with Image.open(sheets[1]) as im:
        assert im.width > 2 * 96 and im.height > 96  # two 3x-upscaled cells with caption space
    (folder / "manifest.jsonl").unlink()
    assert contact_sheets(folder, tmp_path / "all.png", n=2) == [tmp_path / "all.png"]
    with pytest.raises(DfqError, match="inside"):
        contact_sheets(folder, folder / "grid.png")


def test_cli_prompts_similar_pairing_uses_generator(tiny_dir, tmp_path):
    out = tmp_path / "m.jsonl"
    res = CliRunner().invoke(app, ["prompts", "--n", "20", "--pairing", "similar", "--generator", str(tiny_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and all(r["strategy"] == "mixup-similar-k2" and len(set(r["classes"])) == 2 for r in rows)


def test_compose_scenes_hold_two_objects_of_different_classes():
    from dfquant.generate.mini import compose_scenes, pair_caption
    import random

    x = torch.zeros(6, 3, 32, 32)
    for i in range(6):
        x[i, :, 4:28, 4:28] = (i + 1) / 10  # image i: a square of brightness (i+1)/10
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    scenes, pairs = compose_scenes(x, y, 20, seed=1)
    again, pairs2 = compose_scenes(x, y, 20, seed=1)
    assert torch.equal(scenes, again) and torch.equal(pairs, pairs2)
    assert scenes.shape == (20, 3, 32, 32) and scenes.min() >= 0 and scenes.max() <= 1
    assert (pairs[:, 0] != pairs[:, 1]).all()
    for s, (a, b) in zip(scenes, pairs.tolist()):
        levels = set((s[0][s[0] > 0.02] * 10).round().int().unique().tolist())
        # each object's own brightness shows (one may partly cover the other, never wholly: max-blend)
        assert levels & {2 * a + 1, 2 * a + 2} and levels & {2 * b + 1, 2 * b + 2}
    caps = {pair_caption("coat", "bag", random.Random(i)) for i in range(20)}
    assert caps == {"a photo of a coat and a bag", "a photo of a bag and a coat"}


def test_compose_share_is_checked_before_training(tmp_path):
    from dfquant.generate.mini import train_generator

    with pytest.raises(DfqError, match="--compose"):
        train_generator(tmp_path / "g", compose=1.0)
    assert not (tmp_path / "g").exists()

"""Every generator family (SD, SDXL, SD3, PixArt-Sigma, Sana, FLUX.1, FLUX.2 [klein]) built from
tiny random configs, saved as a diffusers folder and run through the same `dfq generate` path
as the mini generator: loading by model_index.json, per-image seeds, resume, 1-vs-2 processes,
prompt_embeds (the learned-prompt hook), and the one-line errors."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfquant.cli import app
from dfquant.data.fmnist import CLASS_NAMES
from dfquant.errors import DfqError
from dfquant.generate import pipeline as gp
from architectures import TINY, tiny_pipeline
from dfquant.generate.learned import base_embeddings, learn_prompts
from dfquant.prompts import make_manifest, write_manifest

SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
# sha256 of the mini generator's PNGs for make_manifest(CLASS_NAMES, 3, "mixup", seed=0) at its preset
# (25 DDIM steps, guidance 3.5, 32 px, float32, CPU), made with the code before any family existed
# (commit f7f911a): the demo's numbers depend on these pixels.
MINI_SHA256 = ["5126280721840ae754a730e5b2c2ebdfb6420b0dccbc388e551fdc816044dad5",
               "db3d02e8a7bdec2311865b2e79bcba7a9466cf5f55609858d4069da6a0c10d23",
               "8e7aea407b3ebf6dcc1fe3a9eb9f9b42fd6ff4820c4864e279862fd447174c18"]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    for name in TINY:
        tiny_pipeline(name).save_pretrained(root / name)
    return {name: root / name for name in TINY}


@pytest.fixture(scope="module")
def rows():
    return make_manifest(list(CLASS_NAMES), 4, "mixup", seed=0)


@pytest.fixture(scope="module")
def manifest(rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "m.jsonl"
    write_manifest(rows, path)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))])


def dfq_generate(manifest: Path, generator: str, out: Path, *extra: str) -> None:
    res = CliRunner().invoke(app, ["generate", str(manifest), "--generator", generator, "--out", str(out), *extra])
    assert res.exit_code == 0, (res.output, res.exception)


@pytest.mark.parametrize("name", TINY)
def test_family_generates_through_dfq_generate(name, family_dirs, rows, tmp_path):
    folder = family_dirs[name]
    two = tmp_path / "m.jsonl"
    write_manifest(rows[:2], two)
    dfq_generate(two, str(folder), tmp_path / "out", *SMALL)
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)
    assert not np.array_equal(*pixels(tmp_path / "out"))  # two seeds, two prompts: two different images
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["generator"] == str(folder) and settings["steps"] == 1
    assert settings.get("call", {}) == gp.PRESETS[name]["call"]  # e.g. flux-schnell's max_sequence_length 256
    preset = gp.preset_for(str(folder))
    assert (preset["steps"], preset["guidance"], preset["size"]) == (gp.PRESETS[name]["steps"], gp.PRESETS[name]["guidance"], None)


@pytest.mark.parametrize("name", TINY)
def test_prompt_embeds_hook_matches_text(name, family_dirs, rows, tmp_path):
    """Feeding the family's own encode_prompt output as prompt_embeds reproduces the text path."""
    pipe = gp.load_pipeline(str(family_dirs[name]), device="cpu")
    args = gp.sampling(name, pipe, steps=1, height=32, width=32)
    embeds = gp.encode(pipe, [r.prompt for r in rows[:2]], args["call"])["prompt_embeds"]
    kw = dict(batch_size=2, progress=False, generator_id=name, **args)
    gp.generate(rows[:2], pipe, tmp_path / "text", **kw)
    gp.generate(rows[:2], pipe, tmp_path / "emb", prompt_embeds=embeds, **kw)
    assert np.abs(pixels(tmp_path / "text") - pixels(tmp_path / "emb")).max() <= 1
    assert json.loads((tmp_path / "emb" / "settings.json").read_text())["prompt_embeds"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_and_two_processes_identical_for_sdxl_and_flux(family_dirs, rows, manifest, tmp_path):
    names = ["sdxl-turbo", "flux-schnell"]
    for name in names:
        dfq_generate(manifest, str(family_dirs[name]), tmp_path / f"{name}-one", *SMALL)
        for killed_after in (2, 1):
            part = tmp_path / f"part{killed_after}.jsonl"
            write_manifest(rows[:killed_after], part)
            resumed = tmp_path / f"{name}-resumed{killed_after}"
            dfq_generate(part, str(family_dirs[name]), resumed, *SMALL)  # "killed" after some images
            (resumed / "manifest.jsonl").unlink()
            dfq_generate(manifest, str(family_dirs[name]), resumed, *SMALL)
            if killed_after == 2:  # the same batches as the uninterrupted run: byte-identical
                assert files(resumed) == files(tmp_path / f"{name}-one")
            else:  # other batch neighbours: batched kernels may round the last float bit differently
                assert np.abs(pixels(resumed) - pixels(tmp_path / f"{name}-one")).max() <= 1
    # Two processes as `accelerate launch` starts them (its RANK/WORLD_SIZE/MASTER_* environment, one
    # accelerate process group over gloo), forked from this process to skip two interpreter start-ups;
    # tests/test_generate.py runs the real launcher once.
    argvs = [["generate", str(manifest), "--generator", str(family_dirs[n]), "--out", str(tmp_path / f"{n}-two"), *SMALL]
             for n in names]
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_accelerate_worker, args=(rank, port, argvs, tmp_path)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0], (tmp_path / "rank0.log").read_text()[-2000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.world")) == ["2", "2"]  # really one group of two
    for name in names:
        assert len(list((tmp_path / f"{name}-two").glob("*.png"))) == 4
        assert files(tmp_path / f"{name}-two") == files(tmp_path / f"{name}-one")


def _accelerate_worker(rank: int, port: int, argvs: list[list[str]], log_dir: Path) -> None:
    import traceback

    from accelerate import PartialState

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    PartialState._reset_state()  # the parent's single-process state was copied by fork
    code = 0
    try:
        for argv in argvs:
            app(argv, standalone_mode=False)
        (log_dir / f"rank{rank}.world").write_text(str(PartialState().num_processes))
    except BaseException:  # noqa: BLE001 - report anything to the parent through the log and exit code
        (log_dir / f"rank{rank}.log").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


@pytest.mark.parametrize("name", ["sdxl-turbo", "flux-schnell"])
def test_learned_prompts_through_the_family(name, family_dirs, resnet20):
    pipe = gp.load_pipeline(str(family_dirs[name]), device="cpu")
    call = gp.PRESETS[name]["call"]
    embeds = learn_prompts(pipe, resnet20, modes=2, iters=2, steps=1, guidance=0.0, lr=0.5, batch_classes=1,
                           progress=False, size=32, call=call)
    base = base_embeddings(pipe, resnet20.class_names, call)
    assert embeds.shape == (10, 2, *base.shape[1:]) and torch.isfinite(embeds).all()
    assert not torch.allclose(embeds[:, 0], base)  # the optimizer moved at least the classes it drew


def test_mini_generator_pixels_unchanged(tmp_path):
    """The mini generator keeps producing the pixels it made before families existed (within float rounding across
    CPUs), and exactly the same bytes when run twice on one machine."""
    # The reference: the PNGs whose sha256 MINI_SHA256 records, committed (about 5 KB). Byte identity with them
    # holds only on CPUs whose float kernels round as that machine's did: on an AMD EPYC (AVX-512 + VNNI, no AMX)
    # one of the 3 images differs, in 1 of its 3072 uint8 values, by 1 (mean |diff| 0.0003); the same build on the
    # same machine with ATEN_CPU_CAPABILITY=default and ONEDNN_MAX_CPU_ISA=SSE41 gives MINI_SHA256's bytes again.
    ref_dir = Path(__file__).parent / "data" / "mini_generator_mixup3"
    refs = sorted(ref_dir.glob("*.png"))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in refs] == MINI_SHA256
    path = tmp_path / "m.jsonl"
    write_manifest(make_manifest(list(CLASS_NAMES), 3, "mixup", seed=0), path)
    runs = []
    for out in ("out", "again"):
        dfq_generate(path, "mini", tmp_path / out, "--threads", "1", "--device", "cpu")
        runs.append(sorted((tmp_path / out).glob("*.png")))
    assert [p.name for p in runs[0]] == [p.name for p in refs]
    # same machine, same process: the same bytes
    assert [p.read_bytes() for p in runs[0]] == [p.read_bytes() for p in runs[1]]
    # across machines: decoded pixels within rounding. Bounds per image, over its 32x32x3 uint8 values: max |diff|
    # <= 4 and mean |diff| <= 0.05. Cross-CPU rounding measured 1 and 0.0003 (above); an output off by 4 levels
    # needs a float error over 1.3% of the range, far beyond rounding noise in a 25-step DDIM sampler. The
    # smallest real changes measured break both bounds on every image, the mean one by 5x or more:
    # guidance 3.4 instead of 3.5 gives mean 0.34-0.45 (max 5-13), 24 DDIM steps instead of 25 mean 0.27-0.70
    # (max 5-16), guidance 3.0 mean 1.9-2.5 (max 31-74).
    for got, ref in zip(runs[0], refs):
        a, b = Image.open(got), Image.open(ref)
        assert (a.mode, a.size) == (b.mode, b.size)
        diff = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
        assert diff.max() <= 4 and diff.mean() <= 0.05, (got.name, int(diff.max()), float(diff.mean()))


def test_prompt_longer_than_clip_is_refused_before_any_file(family_dirs, tmp_path):
    pipe = gp.load_pipeline(str(family_dirs["sdxl-turbo"]), device="cpu")
    names = [f"extraordinarily elongated category designation number {i}" for i in range(6)]
    rows = make_manifest(names, 2, "mixup", k=4, seed=0)
    with pytest.raises(DfqError, match=r"tokens but sdxl-turbo's text encoder takes 77; use fewer labels \(--k\)"):
        gp.generate(rows, pipe, tmp_path / "out", steps=1, guidance=0.0, height=32, width=32, generator_id="sdxl-turbo")
    assert not (tmp_path / "out").exists()


def test_not_text_to_image_and_gated_not_cached(tmp_path, monkeypatch):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(DfqError, match="holds a DDPMPipeline, not a text-to-image pipeline; pass a text-to-image model"):
        gp.load_pipeline(str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DfqError, match=r"stabilityai/stable-diffusion-3.5-medium is gated and not in the Hugging Face "
                                       r"cache; accept its licence at .* run `hf auth login`, then `hf download"):
        gp.load_pipeline("sd35-medium")
    with pytest.raises(DfqError, match="is not in the Hugging Face cache; run `hf download black-forest-labs/FLUX.1-schnell`"):
        gp.load_pipeline("flux-schnell")


def test_readme_shows_the_preset_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, p in gp.PRESETS.items():
        if name == "mini":
            continue
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"README lacks the {name} preset row"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"`{p['id']}`" and cells[2] == p["pipeline"]
        assert (int(cells[3]), float(cells[4]), int(cells[5]), cells[6]) == (p["steps"], p["guidance"], p["size"], p["gpu_dtype"])
        assert ("yes" in cells[7]) == p["gated"]


@pytest.mark.parametrize("name", ["sd35-medium", "pixart-sigma", "flux2-klein"])
def test_class_similarity_for_non_clip_text_encoders(name, family_dirs):
    """Similar/dissimilar mixup pairing ranks classes with any family's first text encoder:
    SD3's projected CLIP, PixArt's T5 and FLUX.2's Qwen (no pooled output) alike."""
    from dfquant.prompts import class_similarity

    pipe = gp.load_pipeline(str(family_dirs[name]), device="cpu")
    sim = class_similarity(list(CLASS_NAMES), pipe.tokenizer, pipe.text_encoder)
    assert sim.shape == (10, 10) and np.allclose(np.diag(sim), 1.0, atol=1e-5) and np.allclose(sim, sim.T, atol=1e-5)
    assert sim[~np.eye(10, dtype=bool)].max() < 1.0 - 1e-6  # distinct classes are told apart


def test_cached_hub_id_loads_offline_by_its_model_index(family_dirs, monkeypatch, tmp_path):
    """A hub id found in the Hugging Face cache loads without network, its class read from model_index.json."""
    import shutil

    repo = tmp_path / "cache" / "models--dfquant-test--tiny-flux"
    commit = "0" * 40
    shutil.copytree(family_dirs["flux-schnell"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    pipe = gp.load_pipeline("dfquant-test/tiny-flux", device="cpu")
    assert type(pipe).__name__ == "FluxPipeline"
    assert gp.preset_for("dfquant-test/tiny-flux")["call"] == {"max_sequence_length": 256}  # flux-schnell's row

"""Bad-input probes (issue 19): run each ``dfq`` command of :data:`PROBES` against a code tree and
record its exit code, its last stderr line and the files it left behind.

    python benchmarks/reliability.py --src src --out benchmarks/results/reliability_after.json
    python benchmarks/reliability.py --src /tmp/dfq_before/src --out benchmarks/results/reliability_before.json

Each probe runs in a fresh working folder with the shared fixtures of :func:`make_fixtures`
(bad images, bad YAML, damaged checkpoints, a NaN model). ``tests/test_bad_inputs.py`` runs the
same probes in-process against the current code; this script records what a user sees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# One argv per probe; {F} is the fixture folder, {W} a fresh working folder (the cwd) where nothing
# may be left behind. ``rc`` is the exit code the current code must give; ``must`` a phrase of its message.
QUICK = ["--iters", "1", "--n", "4", "--batch-size", "2", "--eval-limit", "8"]


@dataclass(frozen=True)
class Probe:
    id: str
    item: str
    argv: tuple[str, ...]
    rc: int = 2
    must: str = ""


PROBES: list[Probe] = [
    # raw tracebacks before
    Probe("calib-truncated-png", "traceback", ("quantize", "fmnist/resnet20", "--calib", "{F}/trunc_png", *QUICK, "--out", "{W}/q"), must="trunc_png"),
    Probe("calib-text-as-png", "traceback", ("quantize", "fmnist/resnet20", "--calib", "{F}/text_png", *QUICK, "--out", "{W}/q"), must="text_png"),
    Probe("run-invalid-yaml", "traceback", ("run", "{F}/invalid.yaml"), must="invalid.yaml"),
    Probe("run-n-string", "traceback", ("run", "{F}/n_string.yaml"), must="sixteen"),
    Probe("eval-truncated-safetensors", "traceback", ("eval", "{F}/ckpt_trunc"), must="model.safetensors"),
    Probe("export-truncated-safetensors", "traceback", ("export", "{F}/ckpt_trunc", "--format", "int-state", "--out", "{W}/m.safetensors"), must="model.safetensors"),
    Probe("eval-bad-json", "traceback", ("eval", "{F}/ckpt_badjson"), must="quant_config.json"),
    Probe("export-bad-json", "traceback", ("export", "{F}/ckpt_badjson", "--format", "int-state", "--out", "{W}/m.safetensors"), must="quant_config.json"),
    Probe("grid-truncated-png", "traceback", ("grid", "{F}/trunc_png", "--out", "{W}/sheet.png"), must="000001.png"),
    Probe("run-config-not-mapping", "traceback", ("run", "{F}/list.yaml"), must="list.yaml"),
    Probe("distill-file-truncated", "traceback", ("quantize", "fmnist/resnet20", "--calib", "{F}/trunc.safetensors", *QUICK, "--out", "{W}/q"), must="trunc.safetensors"),
    # accepted silently before
    Probe("quantize-iters-0", "silent", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "0", "--n", "4", "--batch-size", "2", "--eval-limit", "8", "--out", "{W}/q"), must="--iters"),
    Probe("quantize-iters-negative", "silent", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "-5", "--n", "4", "--batch-size", "2", "--eval-limit", "8", "--out", "{W}/q"), must="--iters"),
    Probe("calib-fewer-images-than-n", "silent", ("quantize", "fmnist/resnet20", "--calib", "{F}/three_png", "--iters", "1", "--n", "1024", "--batch-size", "2", "--eval-limit", "8", "--out", "{W}/q"), must="--n"),
    Probe("eval-nan-weights", "silent", ("eval", "fmnist/resnet20@{F}/nan_zoo"), must="conv1.weight"),
    Probe("quantize-nan-weights-mse", "silent", ("quantize", "fmnist/resnet20@{F}/nan_zoo", "--calib", "real:A", "--algo", "mse", *QUICK, "--out", "{W}/q"), must="conv1.weight"),
    Probe("eval-limit-0", "silent", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "1", "--n", "4", "--batch-size", "2", "--eval-limit", "0", "--out", "{W}/q"), must="--eval-limit"),
    # misleading messages before
    Probe("quantize-batch-size-0", "misleading", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "1", "--n", "4", "--batch-size", "0", "--eval-limit", "8", "--out", "{W}/q"), must="--batch-size"),
    Probe("quantize-nan-weights-genie", "misleading", ("quantize", "fmnist/resnet20@{F}/nan_zoo", "--calib", "real:A", *QUICK, "--out", "{W}/q"), must="conv1.weight"),
    Probe("export-nan-checkpoint", "misleading", ("export", "{F}/ckpt_nan", "--format", "onnx", "--no-verify", "--out", "{W}/m.onnx"), must="non-finite"),
    Probe("run-bits-string", "misleading", ("run", "{F}/bits_string.yaml"), must="list"),
    Probe("eval-empty-name", "misleading", ("eval", ""), must="model name"),
    Probe("quantize-iters-not-a-number", "usage", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "abc"), must="--iters"),
    Probe("unknown-option", "usage", ("eval", "fmnist/resnet20", "--bogus"), must="--bogus"),
    # rough edges
    Probe("hub-generator-not-cached", "rough", ("generate", "{F}/manifest.jsonl", "--generator", "nobody/not-cached-model", "--out", "{W}/img"), must="hf download"),
    Probe("timm-not-cached-hint", "rough", ("eval", "timm/resnet18"), must="hf download"),
    # one-line errors that already worked
    Probe("unknown-model", "works", ("eval", "foo/bar"), must="unknown model"),
    Probe("unknown-zoo-arch", "works", ("eval", "fmnist/resnet99"), must="fmnist/resnet20"),
    Probe("calib-missing", "works", ("quantize", "fmnist/resnet20", "--calib", "{W}/nope", *QUICK, "--out", "{W}/q"), must="not found"),
    Probe("calib-empty-folder", "works", ("quantize", "fmnist/resnet20", "--calib", "{F}/empty_dir", *QUICK, "--out", "{W}/q"), must="no images"),
    Probe("wbits-9", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--wbits", "9", *QUICK, "--out", "{W}/q"), must="--wbits"),
    Probe("abits-ternary", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--abits", "1.58", *QUICK, "--out", "{W}/q"), must="--abits"),
    Probe("unknown-algo", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--algo", "gptq", *QUICK, "--out", "{W}/q"), must="gptq"),
    Probe("bn-recalib-bad", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--bn-recalib", "both", *QUICK, "--out", "{W}/q"), must="both"),
    Probe("augment-unknown", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--augment", "blend", *QUICK, "--out", "{W}/q"), must="mixup, cutmix"),
    Probe("augment-alpha-zero", "works", ("quantize", "fmnist/resnet20", "--calib", "real:A", "--augment", "mixup", "--augment-alpha", "0", *QUICK, "--out", "{W}/q"), must="--augment-alpha"),
    Probe("train-generator-compose-1", "works", ("train-generator", "--compose", "1", "--out", "{W}/gen"), must="--compose"),
    Probe("real-split-c", "works", ("quantize", "fmnist/resnet20", "--calib", "real:C", *QUICK, "--out", "{W}/q"), must="real:A"),
    Probe("run-config-missing", "works", ("run", "{W}/nope.yaml"), must="not found"),
    Probe("run-unknown-key", "works", ("run", "{F}/unknown_key.yaml"), must="colour"),
    Probe("run-wbits-without-abits", "works", ("run", "--wbits", "4"), must="--abits"),
    Probe("run-bad-bit-tag", "works", ("run", "{F}/bad_tag.yaml"), must="W4A4"),
    Probe("eval-not-a-checkpoint", "works", ("eval", "{F}/empty_dir"), must="not a quantized checkpoint"),
    Probe("export-unknown-format", "works", ("export", "{F}/ckpt", "--format", "tflite"), must="tflite"),
    Probe("export-out-suffix", "works", ("export", "{F}/ckpt", "--format", "int-state", "--out", "{W}/m.onnx"), must=".safetensors"),
    Probe("distill-out-suffix", "works", ("distill", "fmnist/resnet20", "--out", "{W}/x.pt"), must=".safetensors"),
    Probe("prompts-classes-missing", "works", ("prompts", "--classes", "{W}/nope.txt", "--out", "{W}/m.jsonl"), must="--classes"),
    Probe("generate-bad-scheduler", "works", ("generate", "{F}/manifest.jsonl", "--scheduler", "magic", "--out", "{W}/img"), must="magic"),
    Probe("train-classifier-torchvision", "works", ("train-classifier", "torchvision/resnet18"), must="fmnist/"),
    Probe("analyze-bad-calib", "works", ("analyze", "fmnist/resnet20", "--calib", "real:A", "--out", "{W}/an"), must="LABEL=SOURCE"),
    Probe("qat-bad-bits", "works", ("qat", "fmnist/resnet20", "--calib", "real:A", "--wbits", "1.58", "--out", "{W}/qat"), must="--wbits"),
]


def make_fixtures(root: Path, zoo: Path, dfq: Callable[[list[str]], None]) -> None:
    """Write every damaged input the probes use into ``root``; ``zoo`` holds the committed zoo weights and
    ``dfq(argv)`` runs the command line of the code under test (it makes the valid checkpoint)."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def png(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)

    for i in range(3):
        png(root / "three_png" / f"{i}.png")
        png(root / "trunc_png" / f"{i:06d}.png")  # the names `dfq generate` writes (`dfq grid` reads only those)
        png(root / "text_png" / f"{i:06d}.png")
    data = (root / "trunc_png" / "000001.png").read_bytes()
    (root / "trunc_png" / "000001.png").write_bytes(data[: len(data) // 2])
    (root / "text_png" / "000001.png").write_text("this is not an image\n")
    (root / "empty_dir").mkdir(exist_ok=True)
    (root / "invalid.yaml").write_text("model: fmnist/resnet20\nbits: [W4A4\nn: 16\n")
    (root / "list.yaml").write_text("- model\n- n\n")
    for name, extra in (("n_string", {"n": "sixteen"}), ("bits_string", {"bits": "W4A4"}),
                        ("unknown_key", {"colour": "red"}), ("bad_tag", {"bits": ["4bit"]})):
        cfg = {"model": "fmnist/resnet20", "source": "real", "iters": 1, "n": 4, "batch_size": 2, "eval_limit": 8,
               "out": str(root / "should_not_exist" / name)} | extra
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    (root / "manifest.jsonl").write_text(json.dumps({"index": 0, "prompt": "a photo of a shirt", "classes": [0],
                                                     "class_names": ["shirt"], "seed": 1, "strategy": "single"}) + "\n")
    nan_zoo = root / "nan_zoo"
    nan_zoo.mkdir(exist_ok=True)
    state = load_file(str(zoo / "fmnist_resnet20.safetensors"))
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(nan_zoo / "fmnist_resnet20.safetensors"))
    shutil.copy(zoo / "fmnist_resnet20.json", nan_zoo / "fmnist_resnet20.json")
    save_file({"images": torch.randn(4, 3, 32, 32)}, str(root / "trunc.safetensors"))
    blob = (root / "trunc.safetensors").read_bytes()
    (root / "trunc.safetensors").write_bytes(blob[: len(blob) // 2])
    ckpt = root / "ckpt"
    if not (ckpt / "quant_config.json").exists():
        dfq(["quantize", "fmnist/resnet20", "--calib", "real:A", *QUICK, "--out", str(ckpt)])
    for name in ("ckpt_trunc", "ckpt_badjson", "ckpt_nan"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(ckpt, root / name)
    blob = (ckpt / "model.safetensors").read_bytes()
    (root / "ckpt_trunc" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (root / "ckpt_badjson" / "quant_config.json").write_text('{"model": "fmnist/resnet20", "quant": {')
    state = load_file(str(ckpt / "model.safetensors"))
    first = next(k for k in state if k.endswith("weight"))
    state[first].view(-1)[0] = float("nan")
    save_file(state, str(root / "ckpt_nan" / "model.safetensors"), metadata={"model": "fmnist/resnet20"})


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_probe(probe: Probe, fixtures: Path, work: Path, python: str, src: Path, timeout: float = 300) -> dict:
    """Run one probe in ``work`` (a fresh folder); report rc, stderr lines, time and leftovers."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    before = snapshot(fixtures)
    argv = [a.replace("{F}", str(fixtures)).replace("{W}", str(work)) for a in probe.argv]
    t0 = time.time()
    try:
        p = subprocess.run([python, "-m", "dfquant.cli", *argv], cwd=work, env=_env(src), capture_output=True,
                           text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = "timeout", (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not ln.lstrip().startswith(("eval", "recon", "genie", "mse"))]
    left = sorted(snapshot(work)) + sorted(snapshot(fixtures) - before)
    return {"id": probe.id, "item": probe.item, "rc": rc, "seconds": round(time.time() - t0, 1),
            "stderr_lines": len(lines), "last": lines[-1][:300] if lines else "", "left": left[:5]}


def _dfq(argv: list[str], work: Path, python: str, src: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "dfquant.cli", *argv], cwd=work, env=_env(src), capture_output=True, text=True, **kw)


def _last(text: str) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def scenarios(fixtures: Path, work: Path, python: str, src: Path) -> list[dict]:
    """Multi-step probes (re-used folders, interrupts, output off a terminal) that one argv cannot express."""
    import signal

    rows = []
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    quick = ["quantize", "fmnist/resnet20", "--calib", "real:A", *QUICK, "--out", str(work / "q")]
    _dfq(quick, work, python, src)
    _dfq(["export", str(work / "q"), "--format", "int-state"], work, python, src)
    p = _dfq(quick, work, python, src)
    rows.append({"id": "requantize-exported-out", "item": "silent", "rc": p.returncode,
                 "last": "files after re-quantizing: " + ", ".join(sorted(x.name for x in (work / "q").iterdir()))})

    p = _dfq([*quick[:-1], str(work / "q2")], work, python, src)
    codes = p.stderr.count("\r") + p.stderr.count("\x1b[")
    rows.append({"id": "progress-off-terminal", "item": "rough", "rc": p.returncode,
                 "last": f"{codes} carriage returns / cursor codes in {len(p.stderr)} bytes of stderr"})

    p = _dfq(["quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "30", "--n", "4", "--batch-size", "2",
              "--eval-limit", "8", "--out", str(work / "q3")], work, python, src)
    eta = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if "estimate" in ln]
    rows.append({"id": "iters-time-estimate", "item": "rough", "rc": p.returncode, "last": eta[0][:300] if eta else "(no estimate printed)"})

    proc = subprocess.Popen([python, "-m", "dfquant.cli", "quantize", "fmnist/resnet20", "--calib", "real:A",
                             "--out", str(work / "q4")], cwd=work, env=_env(src), stderr=subprocess.PIPE, text=True)
    time.sleep(25)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    rows.append({"id": "ctrl-c", "item": "rough", "rc": proc.returncode, "last": _last(err)})

    img = work / "img"
    gen = ["generate", str(fixtures / "manifest.jsonl"), "--out", str(img), "--steps", "1"]
    _dfq(gen, work, python, src)
    png = img / "000000.png"
    whole = png.read_bytes()
    png.write_bytes(whole[: len(whole) // 2])
    (img / "manifest.jsonl").unlink()
    p = _dfq(gen, work, python, src)
    rows.append({"id": "resume-truncated-png", "item": "silent", "rc": p.returncode,
                 "last": "PNG re-rendered (decodes, identical bytes)" if png.read_bytes() == whole else
                 f"truncated PNG kept ({png.stat().st_size} of {len(whole)} bytes)"})

    for pid, argv in (("old-spelling-eval-limit", ["eval", "fmnist/resnet20", "--limit", "8"]),
                      ("new-spelling-eval-limit", ["eval", "fmnist/resnet20", "--eval-limit", "8"]),
                      ("eval-threads", ["eval", "fmnist/resnet20", "--eval-limit", "8", "--threads", "1"])):
        p = _dfq(argv, work, python, src)
        rows.append({"id": pid, "item": "names", "rc": p.returncode, "last": _last(p.stderr) or _last(p.stdout)})
    return rows


ITEMS = {"traceback": "raw traceback before", "usage": "framed usage panel before", "silent": "accepted silently before", "misleading": "misleading message before",
         "rough": "rough edge", "names": "option names", "works": "one line already"}


def table(before: Path, after: Path, after_label: str = "after") -> str:
    """Markdown table: one row per probe, what the code printed before and after (exit code: last stderr line)."""
    b, a = (json.loads(p.read_text()) for p in (before, after))
    old = {r["id"]: r for r in b["rows"]}

    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        text = r["last"].replace("|", "\\|").replace("\n", " ")
        lines = f", {r['stderr_lines']} stderr lines" if r.get("stderr_lines", 1) > 1 else ""
        left = f"; left behind: {', '.join(r['left'])}" if r.get("left") else ""
        took = f" ({r['seconds']:.0f} s)" if r.get("seconds", 0) > 20 else ""
        return f"exit {r['rc']}{lines}{took}: {text}{left}"

    head = f"| probe | kind | before (f7f911a) | after ({after_label}) |\n|---|---|---|---|\n"
    body = "".join(f"| {r['id']} | {ITEMS[r['item']]} | {cell(old.get(r['id']))} | {cell(r)} |\n" for r in a["rows"])
    cmds = "\n".join(f"    OMP_NUM_THREADS=1 python {c}" for c in b["commands"] + a["commands"])
    return (f"# Bad-input probes (issue 19)\n\nMade by\n\n{cmds}\n    python benchmarks/reliability.py --table "
            f"{before} {after} --after-label {after_label}\n\nwhere each `--src` tree is `git archive COMMIT | tar -x -C DIR` "
            f"of the commit named in the table head. Each probe runs `dfq` in a fresh folder (argv in `benchmarks/reliability.py`); a cell is the "
            "exit code, the number of non-empty stderr lines when more than one, the time when over 20 s (on a shared, "
            "loaded 2-core machine), the last stderr line, and any file left behind.\n\n" + head + body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                    help="print the Markdown table of two result files instead of probing")
    ap.add_argument("--after-label", default="after", help="with --table: the commit the AFTER results were made from")
    ap.add_argument("--src", type=Path, help="the src/ folder of the code tree to probe")
    ap.add_argument("--out", type=Path, help="JSON file of results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfq_reliability"))
    ap.add_argument("--only", nargs="*", help="probe ids")
    args = ap.parse_args()
    if args.table:
        print(table(*args.table, args.after_label), end="")
        return
    if args.src is None or args.out is None:
        ap.error("--src and --out are required to probe")
    python = sys.executable
    fixtures = args.work / "fixtures"
    make_fixtures(fixtures, args.src / "dfquant" / "assets" / "zoo",
                  lambda argv: subprocess.run([python, "-m", "dfquant.cli", *argv], check=True, env=_env(args.src),
                                              capture_output=True))
    rows = []
    for probe in PROBES:
        if args.only and probe.id not in args.only:
            continue
        row = run_probe(probe, fixtures, args.work / "w", python, args.src)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.only or "scenarios" in args.only:
        rows += scenarios(fixtures, args.work / "s", python, args.src)
        print(json.dumps(rows[-8:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    commands = [" ".join(sys.argv)]
    if args.only and args.out.exists():  # re-probe a few: keep the other rows and the commands that made them
        old = json.loads(args.out.read_text())
        commands = old["commands"] + commands
        ids = {r["id"] for r in rows}
        rows = [r for r in old["rows"] if r["id"] not in ids] + rows
        order = [p.id for p in PROBES]
        rows.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
    args.out.write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

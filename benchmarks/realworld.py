"""dfquant on a real pretrained model it did not make, through the CLI exactly as a user types it.

The corpus is ``../shared/realworld`` (its README): akamaster/pytorch_resnet_cifar10's CIFAR-10 ResNet-20 and
ResNet-32 (their ``resnet.py`` and pretrained ``.th`` files, loaded with ``--weights``), 1,000 real train JPEGs
(100 a class) and 2,000 test JPEGs (200 a class). The authors' preprocessing is 32x32, no resize or crop,
ImageNet mean/std: dfquant's defaults for a model without a data config, so no preprocessing flag is passed
(the images' size decides, and dfq says so in one line).

Each row is one ``dfq`` command (or a short chain: prompts -> generate -> quantize; quantize -> export) run in a
subprocess; its printed lines are parsed and kept. Rows already in ``<out>.csv`` are skipped, so an interrupted
run resumes row by row. Writes ``<out>.csv``, ``<out>.md`` (with the commands) and ``<out>.png``.

    python benchmarks/realworld.py --threads 2
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from resumable_csv import append_row, log_command, notes_for, open_results

ROOT = Path(__file__).resolve().parent.parent
RW = (ROOT / ".." / "shared" / "realworld").resolve()
FIELDS = ["row", "model", "calib", "algo", "bits", "iters", "n_calib", "fp_top1", "q_top1", "eval_images",
          "onnx_top1", "argmax_agree", "calib_check", "warnings", "seconds", "commands"]
PRINTED: list[str] = []  # what the commands of the current row printed
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dfq(*args: str, log: list[str]) -> str:
    """Run one ``dfq`` command; return stdout + stderr (raise with its output when it fails)."""
    cmd = [str(Path(sys.executable).parent / "dfq"), *args]
    log.append("dfq " + " ".join(shlex.quote(a) for a in args))
    print("  $ " + log[-1], flush=True)
    env = {**os.environ, "DFQ_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    lines = []
    for line in proc.stdout:  # streamed, so the log shows the time estimate and progress lines as they come
        lines.append(line)
        print("    " + line.rstrip(), flush=True)
    proc.wait()
    out = "".join(lines)
    PRINTED.append(out)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {log[-1]}")
    return out


def _num(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else ""


def model_args(arch: str) -> list[str]:
    ref = f"{RW}/akamaster/resnet.py:{arch}"
    weights = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}[arch]
    return [ref, "--weights", f"{RW}/akamaster/pretrained_models/{weights}"]


def rows(args) -> list[dict]:
    """The benchmark's rows: what each measures and how (the calibration source of each quantize row)."""
    out = [{"row": f"eval-{a}", "model": a, "kind": "eval"} for a in ("resnet20", "resnet32")]
    order = [("distill-genie", "genie-m", "W4A4"), ("distill-genie", "genie-m", "W2A4"),
             ("distill-zeroq", "genie-m", "W4A4"), ("distill-zeroq", "genie-m", "W2A4"),
             ("mixup", "genie-m", "W4A4"), ("single", "genie-m", "W4A4"), ("real", "brecq", "W4A4"),
             ("resnet32:real", "genie-m", "W4A4"), ("real", "genie-m", "W4A4"), ("real", "genie-m", "W2A4"),
             ("distill-genie-lite", "genie-m", "W4A4"), ("distill-genie-lite", "genie-m", "W2A4"),
             ("mixup", "genie-m", "W2A4"), ("single", "genie-m", "W2A4")]
    for calib, algo, b in order:
        model, _, calib = calib.rpartition(":")
        model = model or "resnet20"
        out.append({"row": f"{model}-{calib}-{algo}-{b}", "model": model, "kind": "quantize", "calib": calib,
                    "algo": algo, "bits": b})
    return [r for r in out if not args.only or any(re.search(p, r["row"]) for p in args.only)]


def calibration(calib: str, work: Path, args, log: list[str]) -> tuple[str, int]:
    """The ``--calib`` value of a source (made on first use) and its image count."""
    threads = ["--threads", str(args.threads)]
    if calib == "real":
        return f"{RW}/cifar10/train", 1000
    if calib.startswith("distill-"):
        method = calib.split("-", 1)[1]
        path = work / f"distill_{method}_{args.distill_n}_{args.distill_iters}.safetensors"
        if not path.exists():
            dfq("distill", *model_args("resnet20"), "--size", "32", "--method", method, "--n", str(args.distill_n),
                "--iters", str(args.distill_iters), "--out", str(path), *threads, log=log)
        return str(path), args.distill_n
    folder = work / f"gen_{calib}_{args.gen_n}"
    if not (folder / "manifest.jsonl").exists():
        names = work / "cifar10_classes.txt"
        names.write_text("\n".join(CIFAR10) + "\n")
        manifest = work / f"prompts_{calib}_{args.gen_n}.jsonl"
        dfq("prompts", "--classes", str(names), "--n", str(args.gen_n), "--strategy", calib, "--out", str(manifest), log=log)
        dfq("generate", str(manifest), "--generator", "mini", "--out", str(folder), *threads, log=log)
    return str(folder), args.gen_n


def run_row(r: dict, work: Path, args) -> dict:
    log: list[str] = []
    PRINTED.clear()
    t0 = time.time()
    test = f"{RW}/cifar10/test"
    threads = ["--threads", str(args.threads)]
    res = {"row": r["row"], "model": r["model"], "iters": ""}
    if r["kind"] == "eval":
        text = dfq("eval", *model_args(r["model"]), "--val", test, *threads, log=log)
        res.update(fp_top1=_num(r"top-1 ([\d.]+)%", text), eval_images=_num(r"on (\d+) images", text))
    else:
        calib, n = calibration(r["calib"], work, args, log)
        qdir = work / "quant" / r["row"]
        w, a = r["bits"][1:].split("A")
        names = work / "cifar10_classes.txt"
        names.write_text("\n".join(CIFAR10) + "\n")
        text = dfq("quantize", *model_args(r["model"]), "--class-names", str(names), "--calib", calib, "--n", str(n),
                   "--algo", r["algo"], "--wbits", w, "--abits", a, "--iters", str(args.iters), "--val", test,
                   "--out", str(qdir), *threads, log=log)
        exp = dfq("export", str(qdir), "--val", test, "--eval-limit", "2000", "--speed-runs", "0", *threads, log=log)
        res.update(calib=r["calib"], algo=r["algo"], bits=r["bits"], iters=args.iters, n_calib=n,
                   fp_top1=_num(r"FP top-1 ([\d.]+)%", text), q_top1=_num(r"quantized top-1 ([\d.]+)%", text),
                   eval_images=_num(r"\(on (\d+) images\)", text),
                   calib_check=_num(r"classifies ([\d.]+)% of", text),
                   onnx_top1=_num(r"top-1 ([\d.]+)% vs", exp), argmax_agree=_num(r"argmax agreement ([\d.]+)%", exp))
    res["warnings"] = " / ".join(dict.fromkeys(line.removeprefix("warning: ") for out in PRINTED
                                               for line in out.splitlines() if line.startswith("warning:")))
    res["seconds"] = round(time.time() - t0)
    res["commands"] = " && ".join(log)
    return res


def report(csv_path: Path, md_path: Path, png_path: Path, commands: str, args) -> None:
    with open(csv_path) as fh:
        data = list(csv.DictReader(fh))
    lines = ["# dfquant on a real pretrained CIFAR-10 ResNet (akamaster/pytorch_resnet_cifar10), through the CLI\n",
             "Corpus: `../shared/realworld` (2,000 test JPEGs, 200 a class; 1,000 train JPEGs). Float top-1 with the "
             "authors' preprocessing on these 2,000: ResNet-20 80.45, ResNet-32 81.90 (the corpus README).",
             "Quantization: the iterations per block of each row (the paper: 20,000; 2,000 asked, fewer where CPU "
             "time ran short, said per row), seed 0. "
             f"BN inversion: {args.distill_n} images, {args.distill_iters} iterations per batch, each method's "
             "reference batch size (Genie's reference is 4,000 iterations per batch of 128: at the measured ~190 "
             "image-steps/s of one CPU thread (distill_speed.md) 256 images take ~90 min, so fewer were run). "
             f"Generated: {args.gen_n} images from the embedded mini generator, which knows Fashion-MNIST and not "
             "CIFAR-10 (the calibration check and its warning show that).\n",
             "| row | calibration | algo | bits | iters/block | n | FP top-1 | quantized top-1 | on images | "
             "onnxruntime top-1 | argmax agree | prompt-class share | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in data:
        lines.append(f"| {d['row']} | {d['calib']} | {d['algo']} | {d['bits']} | {d['iters']} | {d['n_calib']} | {d['fp_top1']} | "
                     f"{d['q_top1']} | {d['eval_images']} | {d['onnx_top1']} | {d['argmax_agree']} | "
                     f"{d['calib_check']} | {d['seconds']} |")
    warned = [d for d in data if d["warnings"]]
    if warned:
        lines += ["", "Warnings printed:", ""] + [f"- {d['row']}: {d['warnings']}" for d in warned]
    lines += ["", "Each row's exact commands are in the CSV's `commands` column.", "", notes_for(md_path).strip(), "",
              "Made with:", "", commands]
    md_path.write_text("\n".join(lines) + "\n")
    q = [d for d in data if d["q_top1"]]
    if q:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.4 * len(q) + 1.5))
        labels = [f"{d['model']} {d['calib']} {d['algo']} {d['bits']} {d['iters']} it" for d in q]
        ax.barh(labels, [float(d["q_top1"]) for d in q], color="tab:blue", label="quantized (simulated)")
        onnx = [float(d["onnx_top1"]) if d["onnx_top1"] else 0 for d in q]
        ax.scatter(onnx, labels, color="tab:orange", zorder=3, label="onnxruntime")
        for fp, name in ((80.45, "R20 FP"), (81.90, "R32 FP")):
            ax.axvline(fp, ls="--", color="gray", lw=0.8)
            ax.text(fp, -0.9, name, fontsize=7, ha="center")
        ax.set_xlabel("top-1 on 2,000 real CIFAR-10 test JPEGs (%)")
        ax.invert_yaxis()
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--distill-n", type=int, default=256)
    ap.add_argument("--distill-iters", type=int, default=500)
    ap.add_argument("--gen-n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="regexes of the rows to run (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "realworld")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "realworld")
    ap.add_argument("--report-only", action="store_true", help="re-make the .md and .png from the CSV")
    args = ap.parse_args()
    if args.report_only:
        report(args.out.with_suffix(".csv"), args.out.with_suffix(".md"), args.out.with_suffix(".png"),
               log_command(args.out, record=False), args)
        return
    if not RW.is_dir():
        raise SystemExit(f"{RW} not found: this benchmark needs the real-world corpus (../shared/realworld)")
    args.work.mkdir(parents=True, exist_ok=True)
    csv_path = args.out.with_suffix(".csv")
    done = open_results(csv_path, FIELDS, lambda d: (d["row"], str(d["iters"])))
    commands = log_command(args.out)
    for r in rows(args):
        if (r["row"], str(args.iters) if r["kind"] == "quantize" else "") in done:
            continue
        print(f"== {r['row']}", flush=True)
        append_row(csv_path, FIELDS, run_row(r, args.work, args))
        report(csv_path, args.out.with_suffix(".md"), args.out.with_suffix(".png"), commands, args)
    report(csv_path, args.out.with_suffix(".md"), args.out.with_suffix(".png"), commands, args)


if __name__ == "__main__":
    main()

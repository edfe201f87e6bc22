"""QAT on synthetic data (issue 8): PTQ vs NIPQ data-free QAT, and SymReg/SatNL robustness under PTQ.

Part 1 (``--arms``), per zoo model (ResNet-20; MobileNetV2 when its weights exist) and bit setting:
  ptq:synthetic   Genie-M block reconstruction on the synthetic set (``--ptq-iters`` per block)
  qat:synthetic   NIPQ QAT, distillation from the FP model on the synthetic set (``--qat-iters`` steps)
  qat:real        NIPQ QAT on real split A (the real-data upper bound)
  (ptq:real is accepted as well; ptq+bn:synthetic | ptq+bn:real add relative BN re-estimation after Genie-M)
Part 2 (``--robust DIR``, weights from ``dfq train-classifier fmnist/resnet20 --symreg 1e-3 --satnl --out DIR``):
  the robust ResNet-20 vs the plain one under PTQ at ``--robust-bits`` (W8A8 .. W2A4), both calibrated on the
  plain ResNet-20's synthetic set; ``--robust-methods``: ``genie-m`` (block reconstruction) and/or ``rtn`` (no
  reconstruction: MSE range init and round to nearest, where training-time robustness should matter most).

The synthetic set (``--synthetic``): ``generated`` = mixup prompts rendered by the mini generator through
the same stage code as ``dfq run`` (cached by ``calib_cache.cached_source``, shared
with ptq_grid.py), ``distill`` = Genie BN inversion, or any folder / .safetensors calibration source.
Rows are appended to ``<out>.csv`` as they finish, so an interrupted run resumes; ``<out>.md`` (tables +
the exact command) and ``<out>.png`` are rewritten at the end.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dfquant.data.calib import load_calibration  # noqa: E402
from dfquant.errors import DfqError  # noqa: E402
from dfquant.models.evaluate import evaluate  # noqa: E402
from dfquant.io import atomic_path, write_text  # noqa: E402
from dfquant.models.registry import get_model, zoo_dir  # noqa: E402
from dfquant.quant.api import quantize  # noqa: E402
from dfquant.jobs import run_qat  # noqa: E402
from dfquant.run import parse_bits  # noqa: E402
from calib_cache import cached_source  # noqa: E402
from resumable_csv import append_row, log_command, open_results  # noqa: E402

FIELDS = ["part", "model", "variant", "method", "calib", "bits", "seed", "n_calib", "iters", "fp_top1", "q_top1", "seconds"]
ARMS = ("ptq:synthetic", "qat:synthetic", "qat:real", "ptq:real", "ptq+bn:synthetic", "ptq+bn:real")
METHODS = {"ptq": "ptq-genie-m", "ptq+bn": "ptq-genie-m+bnrel", "qat": "nipq-qat"}
ROBUST_METHODS = {"genie-m": "ptq-genie-m", "rtn": "ptq-rtn"}  # rtn = Genie-M's initialization with 0 iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist/resnet20", "fmnist/mobilenetv2"],
                    help="zoo models; those without committed weights are skipped")
    ap.add_argument("--bits", nargs="+", default=["W2A4", "W4A4"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS[:3]), choices=ARMS)
    ap.add_argument("--synthetic", default="generated", help="generated | distill | a folder / .safetensors")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--ptq-iters", type=int, default=2000, help="Genie-M iterations per block")
    ap.add_argument("--qat-iters", type=int, default=2000, help="NIPQ QAT steps (whole network, batch 32)")
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--distill-iters", type=int, default=500, help="for --synthetic distill")
    ap.add_argument("--robust", default=None, help="folder with the SymReg/SatNL-trained fmnist_resnet20 weights")
    ap.add_argument("--robust-bits", nargs="+", default=["W8A8", "W6A6", "W4A4", "W3A4", "W2A4"])
    ap.add_argument("--robust-methods", nargs="+", default=["genie-m"], choices=list(ROBUST_METHODS),
                    help="genie-m: block reconstruction (--ptq-iters); rtn: no reconstruction (MSE range init, "
                         "round to nearest), the setting the robust-quantization paper targets")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/qat")
    ap.add_argument("--report-only", action="store_true", help="only rewrite <out>.md/.png from the CSV")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    done = open_results(csv_path, FIELDS, _key)
    cmds = log_command(out, record=not args.report_only)

    def record(row: dict) -> None:
        print(row, flush=True)
        append_row(csv_path, FIELDS, row)
        done.add(_key(row))

    fp_cache: dict[str, float] = {}

    def fp_top1(spec) -> float:
        if spec.name not in fp_cache:
            fp_cache[spec.name] = round(evaluate(spec, limit=args.eval_limit), 2)
        return fp_cache[spec.name]

    calib_cache: dict[tuple, tuple[str, torch.Tensor]] = {}

    def calibration(spec, which: str) -> tuple[str, torch.Tensor]:
        if (spec.name, which) not in calib_cache:
            src = "real:A" if which == "real" else _synthetic_source(spec, args)
            calib_cache[(spec.name, which)] = (src, load_calibration(src, spec, args.n, args.seed))
        return calib_cache[(spec.name, which)]

    # ----- part 1: PTQ vs NIPQ QAT ---------------------------------------------------------------
    for model in [] if args.report_only else args.models:
        arch = model.partition("/")[2]
        if model.startswith("fmnist/") and not (zoo_dir() / f"fmnist_{arch}.safetensors").exists():
            print(f"skipping {model}: no committed weights (dfq train-classifier {model})", flush=True)
            continue
        spec = get_model(model)
        for bits in args.bits:
            wbits, abits = parse_bits(bits)
            for arm in args.arms:
                method, _, which = arm.partition(":")
                method = METHODS[method]
                row = {"part": "qat", "model": model, "variant": "plain", "method": method, "calib": which, "bits": bits,
                       "seed": args.seed}
                if _key(row) in done:
                    continue
                src, calib = calibration(spec, which)
                fp = fp_top1(spec)
                t0 = time.time()
                if method.startswith("ptq"):
                    qmodel, _ = quantize(spec.model, calib, "genie-m", wbits, abits, iters=args.ptq_iters, batch_size=32,
                                         seed=args.seed, bn_recalib="relative" if method.endswith("bnrel") else "none")
                    q_top1, iters = evaluate(spec, qmodel, limit=args.eval_limit), args.ptq_iters
                else:
                    res = run_qat(model, src, wbits, abits, Path("runs/bench_qat"), args.qat_iters, args.qat_lr,
                                  n=len(calib), seed=args.seed, eval_limit=args.eval_limit, calib=calib, fp_top1=fp,
                                  save=False)
                    q_top1, iters = res["q_top1"], args.qat_iters
                record({**row, "n_calib": len(calib), "iters": iters, "fp_top1": fp, "q_top1": round(q_top1, 2),
                        "seconds": round(time.time() - t0, 1)})

    # ----- part 2: SymReg/SatNL-trained ResNet-20 vs the plain one under PTQ ---------------------
    if args.robust and not args.report_only:
        plain = get_model("fmnist/resnet20")
        robust = get_model(f"fmnist/resnet20@{args.robust}")
        label = "+".join(k for k in ("symreg", "satnl") if robust.card.get(k)) or "robust"
        src, calib = calibration(plain, "synthetic")
        # bits-major: an interrupted sweep still has both models at each finished setting
        for method, bits in ((m, b) for m in args.robust_methods for b in args.robust_bits):
            for spec, variant in ((plain, "plain"), (robust, label)):
                wbits, abits = parse_bits(bits)
                row = {"part": "robust", "model": "fmnist/resnet20", "variant": variant, "method": ROBUST_METHODS[method],
                       "calib": "synthetic", "bits": bits, "seed": args.seed}
                if _key(row) in done:
                    continue
                iters = args.ptq_iters if method == "genie-m" else 0
                t0 = time.time()
                qmodel, _ = quantize(spec.model, calib, "genie-m", wbits, abits, iters=iters, batch_size=32, seed=args.seed)
                record({**row, "n_calib": len(calib), "iters": iters, "fp_top1": fp_top1(spec),
                        "q_top1": round(evaluate(spec, qmodel, limit=args.eval_limit), 2),
                        "seconds": round(time.time() - t0, 1)})
    elif not args.report_only:
        print("part 2 skipped: pass --robust DIR after `dfq train-classifier fmnist/resnet20 --symreg 1e-3 --satnl "
              "--out DIR`", flush=True)

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DfqError(f"no results in {csv_path}; check --models")
    _plot(rows, out.with_suffix(".png"))
    synthetic = args.synthetic if args.synthetic not in ("generated", "distill") else (
        "mixup prompts (k=2, random pairing) rendered by the mini generator" if args.synthetic == "generated"
        else f"Genie BN inversion ({args.distill_iters} iterations)")
    write_text(out.with_suffix(".md"), f"# {out.name}\n\nCommands that produced the rows:\n\n{cmds}\nCPU (1 thread per run), "
               f"{args.n} calibration images, batch 32; synthetic set: {synthetic}; Genie-M: {_iters(rows, 'ptq-genie-m')} "
               f"iterations per block; NIPQ QAT: {_iters(rows, 'nipq-qat')} steps, Adam lr {args.qat_lr:g} (clip 10x), KL distillation from the "
               f"FP model, relative BN re-estimation after hardening, learned clip ranges kept (rows made with the old activation range re-init: pre_no_act_reinit/qat_rows.csv); first/last layer 8 bit; test set "
               f"{'first ' + str(args.eval_limit) if args.eval_limit else 'full 10k'} images; seed {args.seed}.\n\n"
               + _tables(rows) + f"\n![results]({out.with_suffix('.png').name})\n")
    print(f"wrote {csv_path}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def _iters(rows: list[dict], method: str) -> str:
    """The iteration counts the CSV's ``method`` rows record (not this invocation's flags: --report-only has none)."""
    its = sorted({int(r["iters"]) for r in rows if r["method"].startswith(method)})
    return "/".join(map(str, its)) if its else "–"


def _key(r: dict) -> tuple:
    return (r["part"], r["model"], r["variant"], r["method"], r["calib"], r["bits"], str(r["seed"]))


def _synthetic_source(spec, args) -> str:
    if args.synthetic not in ("generated", "distill"):
        return args.synthetic
    return cached_source(spec, "mixup" if args.synthetic == "generated" else "distill", args.seed, args.n,
                         args.distill_iters)


def _tables(rows: list[dict]) -> str:
    parts = []
    qat = [r for r in rows if r["part"] == "qat"]
    if qat:
        arms = list(dict.fromkeys(f"{r['method']} / {r['calib']}" for r in qat))
        head = "| model | bits | FP top-1 | " + " | ".join(arms) + " |\n|---|---|---|" + "---|" * len(arms) + "\n"
        body = ""
        for model, bits in dict.fromkeys((r["model"], r["bits"]) for r in qat):
            cell = {f"{r['method']} / {r['calib']}": r for r in qat if r["model"] == model and r["bits"] == bits}
            fp = next(iter(cell.values()))["fp_top1"]
            body += f"| {model} | {bits} | {float(fp):.2f} | " + " | ".join(
                f"{float(cell[a]['q_top1']):.2f} ({float(cell[a]['seconds']):.0f}s)" if a in cell else "–" for a in arms) + " |\n"
        parts.append("## PTQ vs NIPQ data-free QAT (top-1 %, time)\n\n" + head + body)
    rob = [r for r in rows if r["part"] == "robust"]
    if rob:
        bits = list(dict.fromkeys(r["bits"] for r in rob))
        head = "| method | variant | FP top-1 | " + " | ".join(bits) + " |\n|---|---|---|" + "---|" * len(bits) + "\n"
        body = ""
        for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in rob):
            cell = {r["bits"]: r for r in rob if (r["method"], r["variant"]) == (method, variant)}
            fp = next(iter(cell.values()))["fp_top1"]
            body += f"| {method} | {variant} | {float(fp):.2f} | " + " | ".join(
                f"{float(cell[b]['q_top1']):.2f}" if b in cell else "–" for b in bits) + " |\n"
        parts.append("## SymReg/SatNL-trained vs plain ResNet-20 under PTQ on the synthetic set (top-1 %)\n\n"
                     "ptq-genie-m: block reconstruction; ptq-rtn: no reconstruction (MSE range init, round to nearest).\n\n"
                     + head + body)
    return "\n".join(parts)


def _plot(rows: list[dict], path: Path) -> None:
    qat = [r for r in rows if r["part"] == "qat"]
    rob = [r for r in rows if r["part"] == "robust"]
    panels = [p for p in (qat, rob) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    axes = list(axes[0])
    if qat:
        ax = axes.pop(0)
        groups = list(dict.fromkeys(f"{r['model'].split('/')[-1]}\n{r['bits']}" for r in qat))
        arms = list(dict.fromkeys(f"{r['method']} / {r['calib']}" for r in qat))
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            vals = {f"{r['model'].split('/')[-1]}\n{r['bits']}": float(r["q_top1"]) for r in qat
                    if f"{r['method']} / {r['calib']}" == arm}
            xs = [j for j, g in enumerate(groups) if g in vals]
            ax.bar([x + (i - (len(arms) - 1) / 2) * width for x in xs], [vals[groups[x]] for x in xs], width, label=arm,
                   color=f"C{i}")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("top-1 (%)")
        ax.set_title("PTQ vs NIPQ data-free QAT")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(arms))
    if rob:
        ax = axes.pop(0)
        bits = list(dict.fromkeys(r["bits"] for r in rob))
        methods = list(dict.fromkeys(r["method"] for r in rob))
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rob)):
            for method in methods:
                vals = {r["bits"]: float(r["q_top1"]) for r in rob if (r["variant"], r["method"]) == (variant, method)}
                xs = [j for j, b in enumerate(bits) if b in vals]
                ax.plot(xs, [vals[bits[j]] for j in xs], marker="o", label=f"{variant} / {method}", color=f"C{i}",
                        ls="-" if method == methods[0] else "--")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_ylabel("top-1 (%)")
        ax.set_title("ResNet-20 under PTQ (synthetic calibration)")
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

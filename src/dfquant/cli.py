"""The ``dfq`` command line. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from dfquant.errors import DfqError
from dfquant.quant.algorithms import ALGOS
from dfquant.validate import ITERS_ALLOW_ZERO, check_options

T = TypeVar("T")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-free post-training quantization of image classifiers.")


def _require_safetensors(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise DfqError(f"--out {out} must end in .safetensors")


def _renamed(old: str, new: str, old_value: Optional[T], value: T) -> T:
    """An old option spelling keeps working, with one line naming the option that replaces it."""
    if old_value is None:
        return value
    typer.echo(f"warning: {old} is deprecated; use {new}", err=True)
    return old_value


MODEL_HELP = "registry name (fmnist/resnet20, torchvision/resnet50, timm/<name>) or path/to/file.py:factory / package.module:factory"
TARGET_HELP = ("deployment target: onnxruntime (simulate what its integer kernels compute, so the export is the "
               "evaluated model and runs fast); default: the papers' conventions")

# The model arguments every command takes (dfquant.models.source.ModelArgs), added by @model_options.
_MODEL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "weights": (Optional[Path], typer.Option(None, rich_help_panel="Model", help="file.py:factory models: state dict "
                "to load (.pt/.pth/.th/.safetensors; `module.` prefixes, a nested state_dict key and absent BN "
                "num_batches_tracked handled)")),
    "num_classes": (Optional[int], typer.Option(None, rich_help_panel="Model", help="file.py:factory models: "
                    "num_classes passed to the factory")),
    "class_names": (Optional[Path], typer.Option(None, rich_help_panel="Model", help="text file, one class name per "
                    "model output (the prompt vocabulary; default: the model's own, else 'class i')")),
    "size": (Optional[int], typer.Option(None, rich_help_panel="Model", help="input size (default: the model's data "
             "config, else the size of the images given)")),
    "resize": (Optional[int], typer.Option(None, rich_help_panel="Model", help="resize the short side to this before "
               "the centre crop of --size (default: --size / --crop-pct)")),
    "crop_pct": (Optional[float], typer.Option(None, rich_help_panel="Model", help="centre-crop fraction, 1 = no crop "
                 "(default: the model's data config, else 1)")),
    "interpolation": (Optional[str], typer.Option(None, rich_help_panel="Model", help="resize interpolation: nearest, "
                      "bilinear, bicubic, ... (default: the model's data config, else bilinear)")),
    "mean": (Optional[str], typer.Option(None, rich_help_panel="Model", help="normalization mean per channel, e.g. "
             "0.485,0.456,0.406 (default: the model's data config, else ImageNet's)")),
    "std": (Optional[str], typer.Option(None, rich_help_panel="Model", help="normalization std per channel "
            "(default: the model's data config, else ImageNet's)")),
}


def model_options(fn: Callable) -> Callable:
    """Give a command the model arguments of :data:`_MODEL_OPTIONS`; it receives them as ``margs`` (a dict
    of the values given, mean/std parsed), to pass to ``ModelArgs(model, **margs)``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "margs"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, (ann, opt) in _MODEL_OPTIONS.items()]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in _MODEL_OPTIONS}
        check_options(**given)
        for key in ("mean", "std"):
            given[key] = _floats(given[key], f"--{key}")
        kwargs["margs"] = {k: v for k, v in given.items() if v is not None}
        return fn(**kwargs)

    command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return command


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DfqError(f"{what} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _spec(model: str, margs: dict[str, Any], pretrained: bool = True, folder: Optional[Path] = None):
    """The ModelSpec of a registry name or a file.py:factory model with the model arguments given;
    ``folder``: images whose size decides when neither the model nor --size does."""
    from dfquant.models.source import ModelArgs, ensure_input_size, resolve_model

    spec = resolve_model(ModelArgs(model, pretrained=pretrained, **margs))
    folder = folder if folder is not None and Path(folder).is_dir() else None
    return ensure_input_size(spec, folder)


def _stem(model: str) -> str:
    """A folder name for a model reference: fmnist/resnet20 -> fmnist_resnet20, net.py:r20 -> net_r20."""
    if ":" in model:
        return Path(model.rpartition(":")[0]).stem + "_" + model.rpartition(":")[2]
    return model.replace("/", "_").replace("@", "_")


def _threads(n: Optional[int]) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


@app.command("models")
def models_cmd() -> None:
    """List the model names dfq resolves."""
    from dfquant.models.registry import list_models

    for name in list_models():
        typer.echo(name)


@app.command("train-classifier")
def train_classifier_cmd(
    model: str = typer.Argument(..., help="zoo model, e.g. fmnist/resnet20"),
    epochs: int = typer.Option(15, help="training epochs"),
    batch_size: int = typer.Option(128),
    lr: Optional[float] = typer.Option(None, help="peak LR (default 0.1 SGD for CNNs, 1e-3 AdamW for ViT)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="output folder (default: the package's assets/zoo)"),
    symreg: float = typer.Option(0.0, help="SymReg coefficient: add SYMREG x weight-asymmetry penalty (robust variant, needs --out)"),
    satnl: bool = typer.Option(False, "--satnl", help="replace ReLUs by a saturating nonlinearity (robust variant, needs --out)"),
    satnl_bound: float = typer.Option(4.0, help="SatNL saturation level c (outputs in [0, c])"),
    satnl_mode: str = typer.Option("tanh", help="SatNL shape: tanh (c*tanh(relu(x)/c)) or hard (clamp(x, 0, c))"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Train a Fashion-MNIST zoo classifier on split A and write its weights and model card.

    With --symreg/--satnl it trains a quantization-robust variant into --out DIR; use it as
    fmnist/<arch>@DIR in the other commands (e.g. `dfq quantize fmnist/resnet20@DIR ...`).
    """
    check_options(**locals())
    from dfquant.models import zoo
    from dfquant.models.registry import zoo_dir
    from dfquant.models.train import train_classifier
    from dfquant.models.robust import SATNL_MODES

    _threads(threads)
    source, _, arch = model.partition("/")
    if source != "fmnist" or arch not in zoo.ARCHS:
        raise DfqError("train-classifier trains the zoo only; choose one of: " + ", ".join(f"fmnist/{a}" for a in zoo.ARCHS))
    if symreg < 0:
        raise DfqError(f"--symreg {symreg:g} must be >= 0 (e.g. 1e-3)")
    if satnl and (satnl_mode not in SATNL_MODES or not satnl_bound > 0):
        raise DfqError(f"--satnl-mode must be one of {', '.join(SATNL_MODES)} and --satnl-bound positive")
    if (symreg > 0 or satnl) and out is None:
        raise DfqError("a robust variant (--symreg/--satnl) must not overwrite the committed zoo; pass --out DIR")
    card = train_classifier(arch, out or zoo_dir(), epochs, batch_size, lr, seed, symreg=symreg, satnl=satnl,
                            satnl_bound=satnl_bound, satnl_mode=satnl_mode)
    typer.echo(f"{model}: test top-1 {card['test_top1']:.2f}%")


@app.command("eval")
@model_options
def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP + ", or a quantized checkpoint folder"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder (needed off the mini world)"),
    eval_limit: Optional[int] = typer.Option(None, help="evaluate on N test images (a class-balanced subset, fixed seed)"),
    random_weights: bool = typer.Option(False, help="build the architecture without downloading weights"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    limit: Optional[int] = typer.Option(None, hidden=True, help="deprecated: --eval-limit"),
    margs: Optional[dict] = None,
) -> None:
    """Print top-1 accuracy on the model's test set."""
    eval_limit = _renamed("--limit", "--eval-limit", limit, eval_limit)
    check_options(**locals())
    _threads(threads)
    from dfquant.models.evaluate import evaluate

    if model and Path(model).is_dir():  # Path("") is "."
        from dfquant.models.source import load_quantized_spec

        spec, qmodel = load_quantized_spec(Path(model), **margs)
        acc = evaluate(spec, qmodel, val, eval_limit)
        typer.echo(f"{model} ({spec.name} quantized): top-1 {acc.describe()}")
        return
    spec = _spec(model, margs, pretrained=not random_weights, folder=val)
    acc = evaluate(spec, val_dir=val, limit=eval_limit)
    typer.echo(f"{model}: top-1 {acc.describe()}")


@app.command("train-generator")
def train_generator_cmd(
    out: Path = typer.Option(None, help="output pipeline folder (default: the package's assets/generator)"),
    vae_epochs: int = typer.Option(1, help="VAE epochs over split B"),
    unet_steps: int = typer.Option(1400, help="UNet + text-encoder steps at batch 128"),
    seed: int = typer.Option(0),
    compose: float = typer.Option(0.0, help="share of two-object scenes ('a photo of a X and a Y') in the training set; "
                                            "> 0 trains mini-compose (default folder assets/generator-compose)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Train the embedded mini text-to-image generator on Fashion-MNIST split B."""
    check_options(**locals())
    from dfquant.generate.mini import train_generator
    from dfquant.generate.pipeline import mini_generator_dir

    _threads(threads)
    default = mini_generator_dir("mini-compose" if compose > 0 else "mini")
    card = train_generator(out or default, vae_epochs, unet_steps, seed, command="dfq " + " ".join(sys.argv[1:]),
                           compose=compose)
    typer.echo(f"mini generator trained in {card['vae_seconds'] + card['unet_seconds']:.0f}s")


def _class_names(classes: str) -> list[str]:
    """Class names from a known label set or a text file (one name per line)."""
    if classes == "fmnist":
        from dfquant.data.fmnist import CLASS_NAMES

        return list(CLASS_NAMES)
    if classes == "imagenet":
        from dfquant.data.imagenet import imagenet_class_names

        return imagenet_class_names()
    path = Path(classes)
    if not path.is_file():
        raise DfqError(f"--classes {classes!r} is not fmnist, imagenet, or a text file with one class name per line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DfqError(f"{path} lists {len(names)} class names; put at least two, one per line")
    return names


@app.command("prompts")
def prompts_cmd(
    classes: str = typer.Option("fmnist", help="fmnist, imagenet, or FILE.txt with one class name per line"),
    n: int = typer.Option(1024, help="number of prompts (one image each)"),
    strategy: str = typer.Option("mixup", help="single, template, mixup or learned (then `dfq learn-prompts`)"),
    k: int = typer.Option(2, help="labels per mixup prompt"),
    pairing: str = typer.Option("random", help="mixup pairing: random, similar or dissimilar"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("manifest.jsonl"), help="manifest (JSONL) to write"),
    generator: Optional[str] = typer.Option(None, help="generator whose text encoder ranks classes (similar/dissimilar pairing only)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Write a prompt manifest: one row per image with its prompt, classes and seed."""
    check_options(**locals())
    from dfquant.prompts import class_similarity, make_manifest, write_manifest

    _threads(threads)
    names = _class_names(classes)
    similarity = None
    if strategy == "mixup" and pairing in ("similar", "dissimilar") and generator:
        from dfquant.generate.pipeline import load_pipeline

        pipe = load_pipeline(generator)
        similarity = class_similarity(names, pipe.tokenizer, pipe.text_encoder)
    rows = make_manifest(names, n, strategy, k, pairing, seed, similarity)
    write_manifest(rows, out)
    typer.echo(f"{len(rows)} prompts ({rows[0].strategy}) over {len(names)} classes -> {out}")


@app.command("generate")
def generate_cmd(
    manifest: Path = typer.Argument(..., help="prompt manifest from `dfq prompts`"),
    generator: str = typer.Option("mini", help="mini, a preset (sd15, sd-turbo, sdxl-turbo, sd35-medium, pixart-sigma, sana, flux-schnell, flux2-klein), a diffusers folder or a hub id"),
    out: Path = typer.Option(..., help="image folder to write (re-run the same command to resume)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the generator's preset)"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale (default: preset)"),
    height: Optional[int] = typer.Option(None, help="image height (default: preset)"),
    width: Optional[int] = typer.Option(None, help="image width (default: preset)"),
    batch_size: int = typer.Option(32, help="prompts per pipeline call"),
    scheduler: Optional[str] = typer.Option(None, help="ddim, dpm, euler, euler-a, pndm or lcm (default: the pipeline's own)"),
    dtype: str = typer.Option("auto", help="auto (the family's preset dtype on a GPU, float32 on the CPU), float32, float16 or bfloat16"),
    device: Optional[str] = typer.Option(None, help="torch device (default: accelerate's choice for this process)"),
    prompt_embeds: Optional[Path] = typer.Option(None, help="learned embeddings from `dfq learn-prompts` (learned manifests)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Render one PNG per manifest row (resumable; re-run the same command after a crash).

    Scale out with `accelerate launch --multi_gpu --num_processes N -m dfquant.cli generate ...`;
    each process renders its share. (accelerate's own --cpu flag starts one process only; on a GPU
    machine pass --device cpu to dfq for CPU workers.)
    """
    check_options(**locals())
    import torch
    from accelerate import PartialState

    from dfquant.generate.pipeline import ALIASES, generate, load_pipeline, preset_for, sampling
    from dfquant.prompts import read_manifest

    _threads(threads)
    rows = read_manifest(manifest)
    # Without an accelerator, accelerate only forms a CPU process group when told cpu=True;
    # otherwise every launched process would think it is alone and render every image.
    has_accel = torch.cuda.is_available() or torch.backends.mps.is_available()
    state = PartialState(cpu=device == "cpu" or (device is None and not has_accel))
    if "WORLD_SIZE" in os.environ and state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise DfqError(f"launched {os.environ['WORLD_SIZE']} processes but accelerate formed a group of {state.num_processes}; pass --device cpu")
    pipe = load_pipeline(generator, dtype, device or str(state.device), scheduler)
    args = sampling(generator, pipe, steps, guidance, height, width)
    lo, hi = preset_for(generator, type(pipe).__name__)["steps_range"]
    if not lo <= args["steps"] <= hi and state.is_main_process:
        typer.echo(f"warning: {generator} is meant for {lo}-{hi} steps, got {args['steps']}", err=True)
    embeds = None
    if prompt_embeds is not None:
        from dfquant.generate.learned import load_embeddings, rows_embeddings

        embeds = rows_embeddings(rows, load_embeddings(prompt_embeds))
    path = generate(rows, pipe, out, batch_size=batch_size, generator_id=ALIASES.get(generator, generator), state=state,
                    prompt_embeds=embeds, **args)
    if state.is_main_process:
        typer.echo(f"{len(rows)} images in {out} ({path.name} written)")


@app.command("grid")
def grid_cmd(
    folder: Path = typer.Argument(..., help="image folder written by `dfq generate`"),
    out: Optional[Path] = typer.Option(None, help="sheet PNG (default: <folder>_grid.png beside the folder)"),
    per_sheet: int = typer.Option(64, help="images per sheet"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    n: Optional[int] = typer.Option(None, hidden=True, help="deprecated: --per-sheet"),
) -> None:
    """Contact sheet of generated images with their prompts; one sheet per prompt strategy."""
    per_sheet = _renamed("--n", "--per-sheet", n, per_sheet)
    check_options(**locals())
    from dfquant.generate.grid import contact_sheets

    _threads(threads)
    for path in contact_sheets(folder, out, per_sheet):
        typer.echo(str(path))


@app.command("quantize")
@model_options
def quantize_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    calib: str = typer.Option(..., help="calibration source: real:A, a folder of images, or a .pt/.safetensors image tensor "
                              "(already normalized, e.g. `dfq distill` output)"),
    wbits: float = typer.Option(4, help="weight bits (2..8, or 1.58 ternary)"),
    abits: float = typer.Option(4, help="activation bits (2..8)"),
    algo: str = typer.Option("genie-m", help=" | ".join(ALGOS)),
    iters: int = typer.Option(20000, help="reconstruction iterations per block (paper: 20000; 0: range initialization only, RepQ-ViT as published)"),
    joint_iters: int = typer.Option(0, help="then optimize all quantization parameters jointly (logit + feature distillation)"),
    bn_recalib: str = typer.Option("none", help="relative | absolute | none: re-estimate BatchNorm statistics after "
                                   "reconstruction (Genie-M keeps BN; relative suits synthetic data)"),
    target: Optional[str] = typer.Option(None, help=TARGET_HELP),
    n: int = typer.Option(1024, help="calibration images"),
    augment: str = typer.Option("none", help="none | mixup | cutmix: pixel-level mixing of the calibration images in pairs "
                                "(the mixup-class paper's baselines), deterministic per image index and --seed"),
    augment_alpha: float = typer.Option(1.0, help="Mixup/CutMix lambda ~ Beta(alpha, alpha); CutMix box area 1 - lambda"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="checkpoint folder (default runs/quantize/<model>-w<W>a<A>-<algo>)"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder (off the mini world)"),
    eval_limit: Optional[int] = typer.Option(None, help="evaluate on N test images (a class-balanced subset, fixed seed)"),
    device: str = typer.Option("cpu"),
    keep_fp: list[str] = typer.Option([], help="module-name glob left in float (repeatable), e.g. 'head' or 'layer4.*'"),
    units: Optional[str] = typer.Option(None, help="comma-separated module names to reconstruct as units (default: from the graph)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    margs: Optional[dict] = None,
) -> None:
    """Quantize a model with block reconstruction and print FP vs quantized top-1 (when it has a test set or --val)."""
    check_options(minimum=ITERS_ALLOW_ZERO, **locals())
    from dfquant.jobs import run_quantize

    _threads(threads)
    calib_dir = Path(calib) if Path(calib).is_dir() else None
    spec = _spec(model, margs, folder=val if val is not None else calib_dir)
    out = out or Path("runs/quantize") / f"{_stem(model)}-w{wbits:g}a{abits:g}-{algo}{'-' + target if target else ''}"
    res = run_quantize(spec, calib, wbits, abits, algo, iters, n, batch_size, seed, out, val, eval_limit, device,
                       joint_iters=joint_iters, bn_recalib=bn_recalib, keep_fp=tuple(keep_fp),
                       units=[u.strip() for u in units.split(",") if u.strip()] if units else None,
                       augment=augment, augment_alpha=augment_alpha, target=target)
    accuracy = (f"FP top-1 {res['fp_top1']:.2f}%  quantized top-1 {res['q_top1']:.2f}% (on {res['eval_images']} images)"
                if res["q_top1"] is not None
                else "no test set (pass --val to evaluate)")
    typer.echo(f"{model} W{wbits:g}A{abits:g} {algo}: {accuracy}  ({res['seconds']:.0f}s) -> {out}")


@app.command("plan")
@model_options
def plan_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    algo: str = typer.Option("genie-m", help=" | ".join(ALGOS)),
    wbits: float = typer.Option(4), abits: float = typer.Option(4),
    keep_fp: list[str] = typer.Option([], help="module-name glob left in float (repeatable)"),
    units: Optional[str] = typer.Option(None, help="comma-separated module names to use as units"),
    target: Optional[str] = typer.Option(None, help=TARGET_HELP + "; lists what it adds"),
    margs: Optional[dict] = None,
) -> None:
    """Show the quantization plan: units in execution order, each layer's role, bits and input quantizer, BN folds, float parts."""
    import torch

    from dfquant.api import plan

    spec = _spec(model, margs, pretrained=False)
    p = plan(spec.model, torch.zeros(1, *spec.input_size), wbits=wbits, abits=abits, algo=algo, keep_fp=tuple(keep_fp),
             units=[u.strip() for u in units.split(",") if u.strip()] if units else None, target=target)
    typer.echo(str(p))


@app.command("distill")
@model_options
def distill_cmd(
    model: str = typer.Argument(..., help="model with BatchNorm layers: " + MODEL_HELP),
    out: Path = typer.Option(..., help="output .safetensors file (re-run the same command to resume)"),
    n: int = typer.Option(1024, help="images to synthesize"),
    method: str = typer.Option("genie", help="genie (Genie-D: generator + latents, swing) | zeroq (ZeroQ: pixels) | "
                               "genie-lite (dfquant's lighter generator, 500 steps)"),
    iters: Optional[int] = typer.Option(None, help="optimization steps per batch (default: the method's reference: "
                                        "genie 4000, zeroq 500, genie-lite 500)"),
    batch_size: Optional[int] = typer.Option(None, help="images per inversion batch (default: the method's reference)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    margs: Optional[dict] = None,
) -> None:
    """Synthesize calibration images by BN-statistics inversion (Genie-D / ZeroQ), at the model's input size."""
    check_options(**locals())
    from dfquant.io import save_tensors
    from dfquant.data.distill import METHODS, distill

    _threads(threads)
    _require_safetensors(out)
    if method not in METHODS:
        raise DfqError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    spec = _spec(model, margs)
    resume = out.with_name(out.name + ".partial")
    images = distill(spec.model, n, spec.input_size, method, iters, batch_size, seed=seed, resume=resume)
    save_tensors(out, {"images": images}, metadata={"model": model, "method": method, "iters": str(iters or "default"),
                                                    "seed": str(seed), "input_size": str(list(spec.input_size))})
    resume.unlink(missing_ok=True)
    typer.echo(f"wrote {len(images)} {method} images of {spec.input_size[-1]}x{spec.input_size[-1]} to {out}")


@app.command("run")
@model_options
def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (see configs/); options below override it"),
    model: Optional[str] = typer.Option(None),
    source: Optional[str] = typer.Option(None, help="generated | real | distill | a folder of images"),
    strategy: Optional[str] = typer.Option(None, help="single | template | mixup | learned"),
    k: Optional[int] = typer.Option(None, help="classes per mixup prompt"),
    pairing: Optional[str] = typer.Option(None, help="random | similar | dissimilar"),
    n: Optional[int] = typer.Option(None, help="calibration images"),
    augment: Optional[str] = typer.Option(None, help="none | mixup | cutmix: pixel-level mixing of the calibration set"),
    augment_alpha: Optional[float] = typer.Option(None, help="Mixup/CutMix lambda ~ Beta(alpha, alpha)"),
    generator: Optional[str] = typer.Option(None, help="mini, mini-compose, sd15, sd-turbo, a hub id or a folder"),
    algo: Optional[str] = typer.Option(None, help=" | ".join(("auto",) + ALGOS)),
    wbits: Optional[float] = typer.Option(None, help="with --abits: a single bit setting (else the config's list)"),
    abits: Optional[float] = typer.Option(None),
    iters: Optional[int] = typer.Option(None, help="reconstruction iterations per block"),
    bn_recalib: Optional[str] = typer.Option(None, help="relative | absolute | none: BatchNorm re-estimation after reconstruction"),
    target: Optional[str] = typer.Option(None, help=TARGET_HELP),
    seed: Optional[int] = typer.Option(None),
    out: Optional[str] = typer.Option(None, help="run folder"),
    val: Optional[str] = typer.Option(None, help="ImageNet-style val folder"),
    eval_limit: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    margs: Optional[dict] = None,
) -> None:
    """Run prompts -> generate -> quantize -> evaluate, reusing finished stages."""
    check_options(minimum=ITERS_ALLOW_ZERO, **locals())
    from dfquant.run import RunConfig, results_table, run

    _threads(threads)
    bits = None
    if (wbits is None) != (abits is None):
        raise DfqError("pass both --wbits and --abits (or neither, to use the config's bit list)")
    if wbits is not None:
        bits = [f"W{wbits:g}A{abits:g}"]
    cfg = RunConfig.load(config, model=model, source=source, strategy=strategy, k=k, pairing=pairing, n=n,
                         augment=augment, augment_alpha=augment_alpha, generator=generator, algo=algo, bits=bits, iters=iters, bn_recalib=bn_recalib, target=target, seed=seed, out=out, val=val,
                         eval_limit=eval_limit, device=device, **_config_values(margs))
    rows = run(cfg)
    typer.echo("\n" + results_table(rows))


def _config_values(margs: dict[str, Any]) -> dict[str, Any]:
    """Model arguments as run-config values (YAML types: str paths, float lists)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in margs.items()}


@app.command("report")
def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="folders written by dfq run"),
    out: Path = typer.Option(Path("report"), help="output folder for report.md and its PNGs"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Write a Markdown report (accuracy table, accuracy vs bits, sample grids, analyses)."""
    check_options(**locals())
    from dfquant.report import write_report

    _threads(threads)
    typer.echo(f"wrote {write_report(run_dirs, out)}")


@app.command("export")
@model_options
def export_cmd(
    ckpt: Path = typer.Argument(..., help="quantized checkpoint folder written by `dfq quantize`"),
    format: str = typer.Option("onnx", "--format", help="onnx (QuantizeLinear/DequantizeLinear graph) | int-state (safetensors of integer weights + scales)"),
    out: Optional[Path] = typer.Option(None, help="output file (default: CKPT/model.onnx or CKPT/model_int.safetensors)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="onnx: run onnxruntime next to the fake-quantized model on --eval-limit test images"),
    eval_limit: int = typer.Option(1000, help="test images for --verify (spread evenly over a --val folder); top-1 may differ by "
                                             "max(1, 0.1% of them) images"),
    opset: int = typer.Option(21, help="ONNX opset; 21+ stores weights of <= 4 bits as INT4/UINT4, 13..20 in int8 containers"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder for --verify (off the mini world)"),
    fuse_bias: bool = typer.Option(False, help="onnx: biases as the Conv/Gemm bias input, so onnxruntime runs QLinearConv; "
                                               "it rounds them to int32, so Convs whose int32 bias cannot reproduce the "
                                               "simulation stay float unless 64 test images show the logits unmoved"),
    speed_runs: int = typer.Option(10, help="onnx: time the export against float32 in onnxruntime over this many "
                                            "interleaved runs at batch 1 and 32 (0: skip)"),
    integer_residual: bool = typer.Option(False, help="onnx, approximate (implies --fuse-bias): 8-bit quantizers on the "
                                                      "residual branches/sums and image input the simulation keeps in "
                                                      "float (scales: max |x| over 64 test images), so every Conv runs "
                                                      "as an integer kernel; verified on top-1 only (1 point)"),
    int8_weights: bool = typer.Option(False, help="onnx, approximate: re-round 8-bit asymmetric weight grids onto "
                                                  "symmetric int8 (u8s8 kernels instead of slow u8u8)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    n: Optional[int] = typer.Option(None, hidden=True, help="deprecated: --eval-limit"),
    margs: Optional[dict] = None,
) -> None:
    """Export a quantized checkpoint for deployment (the fake-quantized model only simulates integers)."""
    eval_limit = _renamed("--n", "--eval-limit", n, eval_limit)
    check_options(**locals())
    from dfquant.jobs import run_export
    from dfquant.quant.export import verification_error

    _threads(threads)
    rep = run_export(ckpt, format, out, verify, eval_limit, opset, val, fuse_bias, raise_on_failure=False,
                     speed_runs=speed_runs, integer_residual=integer_residual, int8_weights=int8_weights,
                     model_overrides=margs)
    exp = rep["export"]
    if format == "onnx":
        kinds: dict[str, int] = {}
        for t in exp["weights"].values():
            kinds[t] = kinds.get(t, 0) + 1
        kept = "wrote" if rep.get("kept", True) else "checked, not kept (verification failed):"
        typer.echo(f"{kept} {exp['path']} (opset {exp['opset']}, {exp['bytes'] / 1024:.0f} KiB; weights: "
                   + ", ".join(f"{c} {t}" for t, c in sorted(kinds.items()))
                   + f"; {exp['ops'].get('QuantizeLinear', 0)} QuantizeLinear, {exp['ops'].get('DequantizeLinear', 0)} DequantizeLinear)")
        b = exp.get("int32_biases")
        if b:
            how = (f"measured on {b['calibration_images']} calibration images" if b["calibration_images"]
                   else "no calibration images to measure the inexact ones")
            typer.echo(f"int32 biases of {b['integer_kernels']} integer kernels: {len(b['exact'])} reproduce the simulation's "
                       f"output integers exactly, {len(b['rounded'])} round them within the logit bound, "
                       f"{len(b['kept_float'])} kept float ({how})")
            if b["kept_float"]:
                typer.echo("  kept float: " + ", ".join(b["kept_float"]))
        v = rep.get("verify")
        if v is not None and v.get("approximate"):
            typer.echo(f"approximate export (not the simulated function) on {v['n']} test images: top-1 "
                       f"{v['top1_onnx']:.2f}% deployed vs {v['top1_torch']:.2f}% simulated, argmax agreement "
                       f"{v['argmax_agreement']:.2f}%")
        elif v is not None:
            tol = rep["tolerance"]
            typer.echo(f"onnxruntime vs fake-quant on {v['n']} test images: top-1 {v['top1_onnx']:.2f}% vs {v['top1_torch']:.2f}% "
                       f"({v['correct_onnx']} vs {v['correct_torch']} correct, tolerance {tol['top1_diff_images']} "
                       f"image{'s' if tol['top1_diff_images'] != 1 else ''}), argmax agreement {v['argmax_agreement']:.2f}%, "
                       f"mean |logit diff| {v['mean_abs_diff']:.2e} = {100 * v['mean_rel_diff']:.3f}% of max |logit| "
                       f"(tolerance {100 * tol['mean_rel_diff']:g}%), max {v['max_abs_diff']:.2e}")
    else:
        typer.echo(f"wrote {exp['path']} ({exp['layers']} layers, {exp['activation_quantizers']} activation quantizers, "
                   f"{exp['tensors']} tensors, {exp['bytes'] / 1024:.0f} KiB)")
    if "deployment" in rep:
        _echo_deployment(rep["deployment"], rep["export"]["fused_bias"])
    if rep.get("note"):
        typer.echo(f"note: {rep['note']}")
    typer.echo(f"report -> {rep['report_path']}")
    err = verification_error(rep)
    if err is not None:
        raise err


def _echo_deployment(dep: dict, fused_bias: bool) -> None:
    """What `dfq export` measured: size and onnxruntime speed against float32, and what runs in float."""
    speed = ", ".join(f"batch {b}: {v['quantized']['median_ms']:.1f} ms vs {v['fp32']['median_ms']:.1f} ms = "
                      f"{v['quantized']['ratio']:.2f}x" for b, v in dep["latency"].items())
    rt = dep["runtime_graph"]
    typer.echo(f"deployment vs float32 (onnxruntime, median of {dep['runs']} interleaved runs): "
               f"{dep['size_ratio']:.1f}x smaller ({dep['bytes'] / 1024:.0f} KiB vs {dep['fp32_bytes'] / 1024:.0f} KiB); "
               f"speed-up {speed}; {rt['integer']} integer and {rt['float']} float Conv/Gemm/MatMul kernels")
    cpu = dep["cpu"]  # {} where the flags are unknown
    if rt["integer"] and cpu.get("x86") and not (cpu["vnni"] or cpu["amx"]):
        typer.echo("  this CPU has no VNNI or AMX: onnxruntime's integer kernels run only about 1.5-2x its float ones "
                   "here; CPUs with them run the same kernels faster (ResNet-18/50: 2.1-2.8x FP32 on a Xeon with both)")
    if not fused_bias and rt["integer"] == 0:
        typer.echo("  no integer kernels: biases are separate float Adds; --fuse-bias lets onnxruntime run QLinearConv "
                   "where its int32 biases reproduce the simulation")


@app.command("analyze")
@model_options
def analyze_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    calib: list[str] = typer.Option(..., help="LABEL=SOURCE, repeatable (e.g. mixup=runs/demo/images, real=real:A)"),
    out: Path = typer.Option(Path("analysis"), help="output folder for PNGs and JSON"),
    wbits: float = typer.Option(2), abits: float = typer.Option(4),
    iters: int = typer.Option(200, help="reconstruction iterations per block for the gradient-norm study"),
    n: int = typer.Option(1024), seed: int = typer.Option(0),
    studies: str = typer.Option("gradnorm,gap,tsne", help="comma-separated subset of gradnorm, gap, tsne"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder: the held-out images (off the mini world)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    margs: Optional[dict] = None,
) -> None:
    """The paper's analyses: gradient-norm traces, generalization gap, t-SNE of features."""
    check_options(**locals())
    from dfquant.analysis.studies import generalization_gap, gradnorm_study, tsne_study
    from dfquant.data.calib import load_calibration
    from dfquant.io import write_json
    from dfquant.quant.api import quantize

    _threads(threads)
    spec = _spec(model, margs, folder=val)
    if not spec.embedded and val is None:
        raise DfqError(f"{model} has no embedded test set for the held-out images; pass --val /path/to/val")
    sets = {}
    for item in calib:
        label, sep, src = item.partition("=")
        if not sep:
            raise DfqError(f"--calib {item!r} must be LABEL=SOURCE")
        sets[label] = load_calibration(src, spec, n, seed)
    chosen = {x.strip() for x in studies.split(",")}
    if not chosen <= {"gradnorm", "gap", "tsne"}:
        raise DfqError(f"--studies {studies!r}: choose from gradnorm, gap, tsne")
    if "gradnorm" in chosen:
        gradnorm_study(spec.model, sets, out, wbits, abits, iters, seed=seed)
    xt, yt = _heldout(spec, val)
    if "gap" in chosen:
        heldout = xt[:512]
        gaps = {}
        for label, images in sets.items():
            q, _ = quantize(spec.model, images, "genie-m", wbits, abits, iters=iters, seed=seed, progress=False)
            gaps[label] = generalization_gap(q, images[:512], heldout)
        write_json(out / "generalization_gap.json", gaps)
    if "tsne" not in chosen:
        _analysis_summary(out, chosen)
        return
    synthetic = {}
    for item in calib:
        label, _, src = item.partition("=")
        classes = _classes_of(src, len(sets[label]), seed)
        if classes is not None:
            synthetic[label] = (sets[label], classes)
    tsne_study(spec.model, xt, yt, synthetic, spec.class_names, out, seed)
    _analysis_summary(out, chosen)


def _heldout(spec, val: Optional[Path], limit: int = 2000):
    """Held-out (normalized images, labels): the embedded test set, or a class-balanced subset of ``val``."""
    import torch

    if val is None:
        from dfquant.models.evaluate import test_tensors

        return test_tensors(spec)
    from dfquant.models.evaluate import val_subset

    ds = val_subset(spec, val, limit)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(list(xs)), torch.tensor(list(ys))


def _analysis_summary(out: Path, chosen: set[str]) -> None:
    """Write and print the numbers of every study side by side (``summary.md``)."""
    from dfquant.analysis.summary import analysis_table
    from dfquant.io import write_text

    table = analysis_table([out])
    write_text(out / "summary.md", table)
    typer.echo(table)
    typer.echo(f"wrote {', '.join(sorted(chosen))} results and summary.md to {out}")


def _classes_of(source: str, n: int, seed: int) -> Optional[list[list[int]]]:
    """Per-image class lists of a calibration source (manifest for generated folders, labels for real)."""
    from dfquant.data import fmnist

    if source.startswith("real"):
        _, y = fmnist.load_split("A", limit=n, seed=seed)
        return [[int(c)] for c in y]
    manifest = Path(source) / "manifest.jsonl"
    if manifest.exists():
        from dfquant.prompts import read_manifest

        return [r.classes for r in read_manifest(manifest)][:n]
    return None


@app.command("qat")
@model_options
def qat_cmd(
    model: str = typer.Argument(..., help="a CNN: " + MODEL_HELP),
    calib: str = typer.Option(..., help="training images: a folder of synthetic images, a distill .safetensors, or real:A"),
    wbits: float = typer.Option(2, help="weight bits (2..8; with --learn-bits the default --avg-bits)"),
    abits: float = typer.Option(4, help="activation bits (2..8)"),
    iters: int = typer.Option(2000, help="QAT steps"),
    lr: float = typer.Option(1e-4, help="Adam LR of the weights (clip ranges 10x, bit logits 1e-2)"),
    learn_bits: bool = typer.Option(False, "--learn-bits", help="learn per-layer weight bit-widths (mixed precision)"),
    avg_bits: Optional[float] = typer.Option(None, help="with --learn-bits: budget on the mean weight bits (default --wbits)"),
    budget_by: str = typer.Option("size", help="with --learn-bits: weigh each layer's bits by its weight count (size: "
                                               "model-size budget) or by its MACs x input bits (bops: BOPs budget)"),
    n: int = typer.Option(1024, help="calibration images"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    bn_recalib: str = typer.Option("relative", help="BN re-estimation after hardening: relative (shift measured on CALIB, "
                                                    "applied to the FP statistics), absolute (CALIB statistics) or none; "
                                                    "on by default here as QAT moves weights far from the FP model"),
    act_reinit: bool = typer.Option(False, "--act-reinit/--no-act-reinit",
                                    help="re-run the activation range search after hardening (replaces NIPQ's learned clip ranges)"),
    out: Optional[Path] = typer.Option(None, help="checkpoint folder (default runs/qat/<model>-w<W>a<A>-nipq)"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder (off the mini world)"),
    eval_limit: Optional[int] = typer.Option(None, help="evaluate on N test images (a class-balanced subset, fixed seed)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    bn_stats: Optional[str] = typer.Option(None, hidden=True, help="deprecated: --bn-recalib"),
    margs: Optional[dict] = None,
) -> None:
    """Data-free QAT with NIPQ: distill from the FP model on the calibration set (no labels), then harden.

    Re-running the same command resumes from OUT/qat_resume.pt.
    """
    bn_recalib = _renamed("--bn-stats", "--bn-recalib", bn_stats, bn_recalib)
    check_options(**locals())
    from dfquant.jobs import run_qat
    from dfquant.quant.nipq import check_qat_args

    _threads(threads)
    check_qat_args(wbits, abits, iters, lr, learn_bits, avg_bits, n, batch_size, bn_recalib, budget_by)
    out = out or Path("runs/qat") / f"{_stem(model)}-w{wbits:g}a{abits:g}-nipq"
    spec = _spec(model, margs, folder=val if val is not None else Path(calib))
    res = run_qat(spec, calib, wbits, abits, out, iters, lr, learn_bits, avg_bits, n, batch_size, seed, val, eval_limit,
                  bn_recalib, act_reinit, budget_by=budget_by)
    bits = (f", mean weight bits {res['avg_weight_bits_learned']:.2f}" + (" (BOPs-weighted)" if budget_by == "bops" else "")
            if learn_bits else "")
    typer.echo(f"{model} W{wbits:g}A{abits:g} NIPQ QAT: FP top-1 {res['fp_top1']:.2f}%  before QAT {res['init_top1']:.2f}%  "
               f"after QAT {res['q_top1']:.2f}%{bits} ({res['seconds']:.0f}s) -> {out}")


@app.command("learn-prompts")
@model_options
def learn_prompts_cmd(
    model: str = typer.Argument(..., help="the classifier to be quantized: " + MODEL_HELP),
    out: Path = typer.Option(..., help="output .safetensors with [classes, modes, seq, dim] prompt embeddings"),
    generator: str = typer.Option("mini", help="mini, a diffusers folder or a cached hub id (e.g. sd-turbo)"),
    modes: int = typer.Option(4, help="learned prompt modes per class"),
    iters: int = typer.Option(100), steps: int = typer.Option(4, help="few-step sampling inside the loop"),
    guidance: float = typer.Option(3.5), lr: float = typer.Option(1e-2), seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    margs: Optional[dict] = None,
) -> None:
    """Learn multi-mode prompt embeddings per class (class, embedding- and feature-diversity terms)."""
    check_options(**locals())
    from dfquant.generate.learned import learn_prompts, save_embeddings
    from dfquant.generate.pipeline import load_pipeline, sampling

    _threads(threads)
    _require_safetensors(out)
    spec = _spec(model, margs)
    pipe = load_pipeline(generator)
    args = sampling(generator, pipe)
    embeds = learn_prompts(pipe, spec, modes, iters, steps, guidance, lr, seed=seed, size=args["height"], call=args["call"])
    save_embeddings(out, embeds, spec.class_names, {"model": model, "generator": generator, "iters": iters, "seed": seed})
    typer.echo(f"wrote {tuple(embeds.shape)} prompt embeddings to {out}")


def _quiet_progress_bars() -> None:
    """Off a terminal (a log file, a pipe, CI) tqdm's redraws are ``\r`` and cursor codes, nested bars
    worse; switch every bar off there (``dfq run`` logs its own lines). Bars are created with an explicit
    ``disable=``, which tqdm's TQDM_DISABLE default cannot override, hence the wrapper."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_dfq_quiet", False):
        return

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init._dfq_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init


def main() -> None:
    """Entry point: turn DfqError into one line on stderr and exit code 2, Ctrl-C into exit 130."""
    import warnings

    warnings.formatwarning = lambda msg, *_a, **_k: f"warning: {msg}\n"  # one line, no source location
    # typer's own exceptions (vendored click or not): usage errors become one line too, not a framed panel
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    if not sys.stderr.isatty() and os.environ.get("DFQ_PROGRESS") != "1":  # DFQ_PROGRESS=1 keeps bars in logs
        _quiet_progress_bars()
    try:
        code = app(prog_name="dfq", standalone_mode=False)  # typer returns 130 for Ctrl-C
    except DfqError as exc:
        # one line even when the error crossed a DataLoader worker, which prepends the worker's traceback
        typer.echo("error: " + exc.render().strip().splitlines()[-1].removeprefix("dfquant.errors.DfqError: "), err=True)
        sys.exit(2)
    except click_exception as exc:
        message = exc.format_message()
        if message:  # empty: `dfq` alone, whose help was just printed
            ctx = getattr(exc, "ctx", None)
            typer.echo(f"error: {message}" + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        typer.echo("interrupted; re-run the same command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

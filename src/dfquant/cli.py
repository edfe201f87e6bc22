"""The ``dfq`` command line. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dfquant.errors import DfqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-free post-training quantization of image classifiers.")


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
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Train a Fashion-MNIST zoo classifier on split A and write its weights and model card."""
    from dfquant.models import zoo
    from dfquant.models.registry import zoo_dir
    from dfquant.models.train import train_classifier

    _threads(threads)
    source, _, arch = model.partition("/")
    if source != "fmnist" or arch not in zoo.ARCHS:
        raise DfqError(f"train-classifier trains the zoo only; choose one of: " + ", ".join(f"fmnist/{a}" for a in zoo.ARCHS))
    card = train_classifier(arch, out or zoo_dir(), epochs, batch_size, lr, seed)
    typer.echo(f"{model}: test top-1 {card['test_top1']:.2f}%")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model name (fmnist/resnet20, torchvision/resnet18, ...) or a quantized checkpoint folder"),
    val: Optional[Path] = typer.Option(None, help="ImageNet-style val folder (needed off the mini world)"),
    limit: Optional[int] = typer.Option(None, help="evaluate on the first N test images"),
    random_weights: bool = typer.Option(False, help="build the architecture without downloading weights"),
) -> None:
    """Print top-1 accuracy on the model's test set."""
    from dfquant.evaluate import evaluate
    from dfquant.models.registry import get_model

    if Path(model).is_dir():
        from dfquant.quant.checkpoint import load_quantized

        spec, qmodel = load_quantized(Path(model))
        acc = evaluate(spec, qmodel, val, limit)
        typer.echo(f"{model} ({spec.name} quantized): top-1 {acc:.2f}%")
        return
    spec = get_model(model, pretrained=not random_weights)
    acc = evaluate(spec, val_dir=val, limit=limit)
    typer.echo(f"{model}: top-1 {acc:.2f}%")


@app.command("train-generator")
def train_generator_cmd(
    out: Path = typer.Option(None, help="output pipeline folder (default: the package's assets/generator)"),
    vae_epochs: int = typer.Option(3, help="VAE epochs over split B"),
    unet_steps: int = typer.Option(4000, help="UNet + text-encoder steps at batch 128"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Train the embedded mini text-to-image generator on Fashion-MNIST split B."""
    from dfquant.generate.mini import train_generator
    from dfquant.generate.pipeline import mini_generator_dir

    _threads(threads)
    card = train_generator(out or mini_generator_dir(), vae_epochs, unet_steps, seed, command="dfq " + " ".join(sys.argv[1:]))
    typer.echo(f"mini generator trained in {card['vae_seconds'] + card['unet_seconds']:.0f}s")


def main() -> None:
    """Entry point: turn DfqError into one line on stderr and exit code 2."""
    try:
        app()
    except DfqError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)

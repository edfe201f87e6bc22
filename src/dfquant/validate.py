"""The one validation layer for values a user types: ``dfq run`` configs (YAML plus command-line
overrides) and the numeric options of every command.

Everything here runs before a folder or file is created, so a typo costs one ``error:`` line
and leaves nothing behind. The run config (:class:`RunConfig`, which `dfq run` executes) lives here too; its schema is derived from it
(its type hints) plus :data:`MINIMUM` and :data:`choices`, so adding a field to ``RunConfig``
validates it without a second list to keep in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dfquant.errors import DfqError

@dataclass
class RunConfig:
    """One experiment. ``source``: generated | real | distill | a folder of images."""

    model: str = "fmnist/resnet20"
    # the model arguments of every command (dfquant.models.source.ModelArgs); None: what the model carries
    weights: str | None = None
    num_classes: int | None = None
    class_names: str | list[str] | None = None  # a text file (one name per line) or the list
    size: int | None = None
    resize: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    source: str = "generated"
    strategy: str = "mixup"          # single | template | mixup | learned
    modes: int = 4                   # learned: prompt modes per class
    learn_iters: int = 100           # learned: optimization steps
    k: int = 2
    pairing: str = "random"
    n: int = 1024
    augment: str = "none"            # mixup | cutmix: pixel-level mixing of the calibration set (the paper's baselines)
    augment_alpha: float = 1.0       # lambda ~ Beta(alpha, alpha)
    generator: str = "mini"
    steps: int | None = None         # None: the generator preset (mini 25, sd15 50, sd-turbo 1, ...)
    guidance: float | None = None
    scheduler: str | None = None
    dtype: str = "auto"              # auto: the family's preset dtype on a GPU, float32 on the CPU
    gen_batch_size: int = 64
    distill_method: str = "genie"    # genie (Genie-D) | zeroq (ZeroQ) | genie-lite (dfquant's former "genie")
    distill_iters: int | None = None  # None: the method's reference budget (genie 4000, zeroq 500, genie-lite 500)
    algo: str = "auto"               # auto: genie-m for CNNs, repq-vit for ViTs (as the paper)
    bits: list[str] = field(default_factory=lambda: ["W4A4"])
    iters: int = 20000
    bn_recalib: str = "none"         # relative | absolute | none: BN re-estimation after reconstruction (not in the papers)
    target: str | None = None        # deployment target (onnxruntime): simulate its integer kernels; None: the papers' conventions
    batch_size: int = 32
    eval_limit: int | None = None
    val: str | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"

    @classmethod
    def load(cls, path: str | Path | None, **overrides: Any) -> RunConfig:
        """Read ``path`` (YAML), apply the non-None ``overrides`` and validate types and ranges
        (:func:`run_config`) before anything is written."""
        data: Any = {}
        p = Path(path) if path is not None else None
        if p is not None:
            if not p.is_file():
                raise DfqError(f"config {p} not found; pass a YAML file (see configs/)")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                mark = getattr(exc, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or type(exc).__name__
                raise DfqError(f"{p} is not valid YAML ({problem}{at}); fix that line (see configs/demo.yaml)") from None
        return run_config(data, p, overrides)


def parse_bits(tag: str) -> tuple[float, float]:
    """'W4A4' -> (4, 4); 'W1.58A8' -> (1.58, 8)."""
    t = tag.upper()
    if not (t.startswith("W") and "A" in t):
        raise DfqError(f"bit setting {tag!r} must look like W4A4 or W1.58A8")
    w, a = t[1:].split("A")
    try:
        return float(w), float(a)
    except ValueError:
        raise DfqError(f"bit setting {tag!r} must look like W4A4 or W1.58A8") from None


# Smallest accepted value of each count-like option (CLI option names with '-' -> '_', and run-config keys).
MINIMUM: dict[str, float] = {
    "n": 1, "iters": 1, "batch_size": 1, "gen_batch_size": 1, "k": 1, "modes": 1, "learn_iters": 1,
    "distill_iters": 1, "eval_limit": 1, "steps": 1, "seed": 0, "joint_iters": 0, "threads": 1, "guidance": 0,
    "per_sheet": 1, "epochs": 1, "unet_steps": 1, "vae_epochs": 0, "height": 8, "width": 8,
    "speed_runs": 0, "augment_alpha": 0.01, "size": 1, "resize": 1, "num_classes": 1, "crop_pct": 0.01,
}
SOURCES = ("generated", "real", "distill")


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the run config's string options (imported lazily: the owners define them)."""
    from dfquant.data.augment import AUGMENTS
    from dfquant.generate.pipeline import DTYPES, SCHEDULERS
    from dfquant.prompts import PAIRINGS, STRATEGIES
    from dfquant.quant.algorithms import ALGOS
    from dfquant.models.source import INTERPOLATIONS
    from dfquant.quant.bn import BN_MODES
    from dfquant.data.distill import METHODS
    from dfquant.quant.target import TARGETS

    return {"strategy": STRATEGIES, "pairing": PAIRINGS, "algo": ("auto", *ALGOS), "bn_recalib": BN_MODES,
            "dtype": tuple(DTYPES), "scheduler": tuple(SCHEDULERS), "distill_method": tuple(METHODS), "augment": AUGMENTS,
            "interpolation": INTERPOLATIONS, "target": tuple(TARGETS)}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


# Where a command's option means something else than the shared name: quantizing with 0 iterations per block
# is range initialization only (RepQ-ViT as published, the others without reconstruction); steps of distillation,
# analysis, QAT and prompt learning need at least one.
ITERS_ALLOW_ZERO = {"iters": 0}


def check_options(*, minimum: dict[str, float] | None = None, **values: Any) -> None:
    """Range-check the command-line options named in :data:`MINIMUM` (others and ``None`` are ignored);
    ``minimum`` overrides it for one command (:data:`ITERS_ALLOW_ZERO`).

    Commands call it as ``check_options(**locals())`` first thing, before any output exists.
    """
    bounds = {**MINIMUM, **(minimum or {})}
    for key, value in values.items():
        if key in bounds and isinstance(value, (int, float)) and not isinstance(value, bool) and value < bounds[key]:
            raise DfqError(f"{_option(key)} {value:g} must be at least {bounds[key]:g}")


def _schema() -> type:
    """A strict pydantic model with RunConfig's fields, types and defaults, plus the ranges of MINIMUM (``iters``:
    reconstruction iterations, 0 allowed as for ``dfq quantize``)."""
    import dataclasses
    import typing
    from typing import Annotated

    from pydantic import ConfigDict, Field, create_model

    hints = typing.get_type_hints(RunConfig)
    run_min = {**MINIMUM, **ITERS_ALLOW_ZERO}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        hint = Annotated[hints[f.name], Field(ge=run_min[f.name])] if f.name in run_min else hints[f.name]
        fields[f.name] = (hint, None)
    return create_model("RunConfigSchema", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def run_config(data: Any, path: Path | None, overrides: Mapping[str, Any]) -> RunConfig:
    """Validate a run config (``data`` from ``path``, then ``overrides`` from the command line) into a RunConfig."""
    import dataclasses

    from pydantic import ValidationError

    where = f" in {path}" if path is not None else ""
    if not isinstance(data, dict):
        raise DfqError(f"{path} must hold `key: value` lines (a YAML mapping), not a {type(data).__name__}; see configs/demo.yaml")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}

    def label(key: str) -> str:
        return _option(key) if key in overrides and overrides[key] is not None else f"`{key}`{where}"

    try:
        checked = _schema().model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RunConfig)})
            raise DfqError(f"unknown key(s) {', '.join(unknown)}{where}; valid keys: "
                           + ", ".join(f.name for f in dataclasses.fields(RunConfig))) from None
        if key == "bits" and err["type"] == "list_type":
            raise DfqError(f"{label(key)} must be a list such as [W4A4, W2A4], got {got!r}") from None
        if err["type"] == "greater_than_equal":
            raise DfqError(f"{label(key)} {got} must be at least {err['ctx']['ge']}") from None
        want = {"int_type": "a whole number", "float_type": "a number", "string_type": "a string",
                "list_type": "a list"}.get(err["type"], err["msg"].lower().removeprefix("input should be "))
        raise DfqError(f"{label(key)} must be {want}, got {got!r}") from None
    for key, allowed in choices().items():
        value = checked.get(key)
        if value is not None and value not in allowed:
            raise DfqError(f"{label(key)} {value!r} is not one of {', '.join(allowed)}")
    source = checked.get("source", "generated")
    if source not in SOURCES and not Path(source).is_dir():
        raise DfqError(f"{label('source')} {source!r} is not {', '.join(SOURCES)} or an existing folder of images")
    if not checked.get("bits", ["W4A4"]):
        raise DfqError(f"{label('bits')} is empty; list at least one setting such as [W4A4]")
    for tag in checked.get("bits", []):
        parse_bits(tag)
    cfg = RunConfig(**checked)
    if cfg.n < cfg.batch_size:
        raise DfqError(f"{label('n')} {cfg.n} is smaller than batch_size {cfg.batch_size}; reconstruction needs at "
                       "least one full batch (raise n or lower batch_size)")
    return cfg

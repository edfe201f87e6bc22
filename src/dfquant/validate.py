"""The one validation layer for values a user types: ``dfq run`` configs (YAML plus command-line
overrides) and the numeric options of every command.

Everything here runs before a folder or file is created, so a typo costs one ``error:`` line
and leaves nothing behind. The run-config schema is derived from :class:`dfquant.run.RunConfig`
(its type hints) plus :data:`MINIMUM` and :data:`choices`, so adding a field to ``RunConfig``
validates it without a second list to keep in sync. :func:`check_finite` is the non-finite
guard used when a model is loaded and before a checkpoint is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from dfquant.errors import DfqError

if TYPE_CHECKING:
    import torch

    from dfquant.run import RunConfig

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
    from dfquant.quant.distill import METHODS

    return {"strategy": STRATEGIES, "pairing": PAIRINGS, "algo": ("auto", *ALGOS), "bn_recalib": BN_MODES,
            "dtype": tuple(DTYPES), "scheduler": tuple(SCHEDULERS), "distill_method": tuple(METHODS), "augment": AUGMENTS,
            "interpolation": INTERPOLATIONS}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_options(**values: Any) -> None:
    """Range-check the command-line options named in :data:`MINIMUM` (others and ``None`` are ignored).

    Commands call it as ``check_options(**locals())`` first thing, before any output exists.
    """
    for key, value in values.items():
        if key in MINIMUM and isinstance(value, (int, float)) and not isinstance(value, bool) and value < MINIMUM[key]:
            raise DfqError(f"{_option(key)} {value:g} must be at least {MINIMUM[key]:g}")


def _schema() -> type:
    """A strict pydantic model with RunConfig's fields, types and defaults, plus the ranges of MINIMUM."""
    import dataclasses
    import typing
    from typing import Annotated

    from pydantic import ConfigDict, Field, create_model

    from dfquant.run import RunConfig

    hints = typing.get_type_hints(RunConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        hint = Annotated[hints[f.name], Field(ge=MINIMUM[f.name])] if f.name in MINIMUM else hints[f.name]
        fields[f.name] = (hint, None)
    return create_model("RunConfigSchema", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def run_config(data: Any, path: Path | None, overrides: Mapping[str, Any]) -> "RunConfig":
    """Validate a run config (``data`` from ``path``, then ``overrides`` from the command line) into a RunConfig."""
    import dataclasses

    from pydantic import ValidationError

    from dfquant.run import RunConfig, parse_bits

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


def first_nonfinite(tensors: Iterable[tuple[str, "torch.Tensor"]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: Iterable[tuple[str, "torch.Tensor"]], what: str, fix: str) -> None:
    """Refuse NaN/inf weights: they make every later number meaningless (a 'top-1' of chance level,
    a checkpoint that cannot be exported), so name the first bad tensor and the fix instead."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise DfqError(f"{what} has non-finite values (NaN or inf) in tensor {bad}; {fix}")

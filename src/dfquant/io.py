"""Atomic file output and run metadata.

Every writer goes through a temporary file in the destination folder followed by
``os.replace`` so an interrupted job never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file

from dfquant.errors import DfqError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, fix: str = "delete it and re-run the command that wrote it") -> Any:
    """Parse a JSON file; a damaged one is a :class:`DfqError` naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DfqError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); {fix}") from None


def load_tensors(path: str | os.PathLike, fix: str = "delete it and re-run the command that wrote it") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or foreign one is a :class:`DfqError` naming the file and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DfqError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); {fix}") from None


def load_torch(path: str | os.PathLike, fix: str = "delete it to start over") -> Any:
    """``torch.load`` of a resume file this project wrote (trusted, so weights_only=False); a damaged one
    (an interrupted copy, a full disk) is a :class:`DfqError` naming the file and ``fix``."""
    import pickle

    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DfqError(f"{path} is damaged and cannot be resumed from ({str(exc).splitlines()[0]}); {fix}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat tensor dict as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def versions() -> dict[str, str]:
    """Versions of the interpreter and the libraries whose behaviour shapes the results."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "diffusers", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional dependency missing is not an error here
            out[name] = "absent"
    from importlib.metadata import PackageNotFoundError, version

    try:  # from the installed metadata: io sits below the package facade and must not import it
        out["dfquant"] = version("dfquant")
    except PackageNotFoundError:
        out["dfquant"] = "not installed"
    return out


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, fix: str) -> None:
    """Refuse NaN/inf weights: they make every later number meaningless (a 'top-1' of chance level,
    a checkpoint that cannot be exported), so name the first bad tensor and the fix instead."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise DfqError(f"{what} has non-finite values (NaN or inf) in tensor {bad}; {fix}")

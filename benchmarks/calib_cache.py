"""Where benchmark calibration sets live, so that scripts and models share them.

Generated sets depend only on the prompts (the class names), the generator and the seed,
so every model with the same label set reuses one folder; BN-inversion (and learned-prompt)
sets depend on the model and stay per model. The root is outside the work tree
(``$DFQ_BENCH_CACHE``, default ``~/.cache/dfquant/bench``) so a fresh checkout on the same
machine reuses what an earlier run rendered.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MODEL_SPECIFIC = ("distill", "learned")


def calib_run_dir(spec, source: str, seed: int) -> str:
    """The ``RunConfig.out`` folder for calibration ``source`` of ``spec`` at ``seed``."""
    root = Path(os.environ.get("DFQ_BENCH_CACHE", Path.home() / ".cache" / "dfquant" / "bench"))
    if source in MODEL_SPECIFIC:
        group = spec.name.replace("/", "_")
    else:
        group = "labels-" + hashlib.sha256("\n".join(spec.class_names).encode()).hexdigest()[:10]
    return str(root / group / f"{source}-s{seed}")

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

from dfquant.run import Run, RunConfig, _calibration_stage

MODEL_SPECIFIC = ("distill", "learned")
# benchmark source name -> the ``RunConfig`` fields that make it (``dfq run`` semantics)
SOURCES = {
    "real": dict(source="real"), "distill": dict(source="distill"),
    "single": dict(strategy="single"), "template": dict(strategy="template"),
    "mixup": dict(strategy="mixup"), "mixup-similar": dict(strategy="mixup", pairing="similar"),
    "mixup-dissimilar": dict(strategy="mixup", pairing="dissimilar"), "mixup-k3": dict(strategy="mixup", k=3),
    "learned": dict(strategy="learned", steps=4),
    # pixel-level baselines (issue 22): the single-class set, mixed in pairs when it is loaded
    "single+mixup": dict(strategy="single", augment="mixup"), "single+cutmix": dict(strategy="single", augment="cutmix"),
    # the compositional mini generator
    "single-compose": dict(strategy="single", generator="mini-compose"),
    "mixup-compose": dict(strategy="mixup", generator="mini-compose"),
}


def base_source(source: str) -> str:
    """The benchmark source whose rendered set ``source`` reads: an augmented source shares its base's folder."""
    return source.partition("+")[0]


def augmentation(source: str) -> dict:
    """The :func:`dfquant.data.augment.augment` arguments of benchmark ``source`` (empty for none)."""
    fields = SOURCES[source]
    return {"method": fields["augment"], "alpha": fields.get("augment_alpha", 1.0)} if "augment" in fields else {}


def calib_run_dir(spec, source: str, seed: int) -> str:
    """The ``RunConfig.out`` folder for calibration ``source`` of ``spec`` at ``seed``."""
    root = Path(os.environ.get("DFQ_BENCH_CACHE", Path.home() / ".cache" / "dfquant" / "bench"))
    if source in MODEL_SPECIFIC:
        group = spec.name.replace("/", "_")
    else:
        group = "labels-" + hashlib.sha256("\n".join(spec.class_names).encode()).hexdigest()[:10]
    return str(root / group / f"{source}-s{seed}")


def cached_source(spec, source: str, seed: int, n: int = 1024, distill_iters: int = 200, progress: bool = True) -> str:
    """The calibration source string (for ``load_calibration``) of benchmark ``source``, rendered on first use.

    Goes through ``dfq run``'s own calibration stage, which resumes a half-written set and reuses a finished one.
    An augmented source returns its base set; apply :func:`augmentation` when loading it.
    """
    base = base_source(source)
    cfg = RunConfig(model=spec.name, n=n, seed=seed, distill_method="genie-lite", distill_iters=distill_iters,
                    out=calib_run_dir(spec, base, seed), **SOURCES[base])
    _, src = _calibration_stage(Run(cfg), spec, progress=progress)
    return src

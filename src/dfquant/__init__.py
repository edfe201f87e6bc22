"""dfquant: data-free post-training quantization of image classifiers.

Calibration images come from a text-to-image latent diffusion model (mixup-class
prompting, arXiv 2507.21947) or from BN-statistics inversion; the model is then
quantized with block-reconstruction PTQ (BRECQ / QDrop / Genie-M, RepQ-ViT).

Python API: :func:`quantize`, :func:`plan`, :func:`save`, :func:`load`, :func:`evaluate`,
:func:`export` (see the README).
"""

__version__ = "0.1.0"
__all__ = ["evaluate", "export", "load", "plan", "quantize", "save"]


def __getattr__(name: str):
    # the API imports torch; `import dfquant` (and the CLI's start-up) stays light until it is used
    if name in __all__:
        from dfquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfquant' has no attribute {name!r}")

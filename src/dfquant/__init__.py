"""dfquant: data-free post-training quantization of image classifiers.

Calibration images come from a text-to-image latent diffusion model (mixup-class
prompting, arXiv 2507.21947) or from BN-statistics inversion; the model is then
quantized with block-reconstruction PTQ (BRECQ / QDrop / Genie-M, RepQ-ViT).
"""

__version__ = "0.1.0"

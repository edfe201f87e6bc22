"""What dfquant knows about a classifier besides its weights: input size, preprocessing and label space.

Its own module (below the registry, which resolves names into it) so that calibration sources,
evaluation and prompt learning can take a :class:`ModelSpec` without importing the model zoo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from dfquant.errors import DfqError

if TYPE_CHECKING:
    from dfquant.quant.checkpoint import ModelRecord

FMNIST_MEAN = (0.2190, 0.2190, 0.2190)
FMNIST_STD = (0.3318, 0.3318, 0.3318)


# what a quantized folder records of the preprocessing (ModelSpec.record), so that it reopens without the model
PREPROCESS_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct", "resize", "class_names")


@dataclass
class ModelSpec:
    """A classifier with its preprocessing and label space."""

    name: str
    model: nn.Module
    input_size: tuple[int, int, int] | None  # None: not known yet (a custom model; the images' size decides)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    card: dict[str, Any] = field(default_factory=dict)
    resize: int | None = None  # short side before the centre crop; None: input size / crop_pct (timm's rule)
    source: dict[str, Any] = field(default_factory=dict)  # how to rebuild the model (saved with a quantized folder)

    def record(self) -> ModelRecord:
        """What a quantized folder records of this model (:class:`~dfquant.quant.checkpoint.ModelRecord`)."""
        from dfquant.quant.checkpoint import ModelRecord

        return ModelRecord(self.name, dict(self.source), {k: getattr(self, k) for k in PREPROCESS_FIELDS})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_vit(self) -> bool:
        from dfquant.quant.transform import has_attention

        return has_attention(self.model)

    @property
    def embedded(self) -> bool:
        """True for the Fashion-MNIST zoo, whose test set ships with the project."""
        return self.name.startswith("fmnist/")

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x01 - mean) / std

    def transform(self) -> Callable:
        """PIL image -> normalized tensor, by the model's own preprocessing: resize the short side to
        ``resize`` (default ``size / crop_pct``, timm's eval rule), centre-crop ``size``, normalize."""
        if self.input_size is None:
            raise DfqError(f"{self.name} has no input size yet; pass --size (or a folder of images whose size decides)")
        if self.resize is None:
            from timm.data import create_transform

            return create_transform(input_size=self.input_size, interpolation=self.interpolation, mean=self.mean,
                                    std=self.std, crop_pct=self.crop_pct, is_training=False)
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize, interpolation=interp), T.CenterCrop(self.input_size[-1]), T.ToTensor(),
                          T.Normalize(self.mean, self.std)])



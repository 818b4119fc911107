"""The training augmentation (PROTOCOL.md section 1) on image tensors, with an explicit generator.

The same pipeline as :func:`pfedmoap_cli.model.transforms.train_transform`:
RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) to the model's size,
a horizontal flip with probability 0.5, then [0, 1] floats normalised with the
model's mean and std. It works on decoded uint8 images (3, H, W) instead of
PIL images, and draws from a ``torch.Generator`` it is given instead of the
global torch RNG, so a client's augmentation is its own stream whatever else
runs in the process.

The draws are torchvision's, in torchvision's order: for each image, the crop
box exactly as ``RandomResizedCrop.get_params`` draws it, then the flip as
``RandomHorizontalFlip`` draws it. A generator seeded like the global RNG of
the PIL path therefore gives the same boxes and flips; only the resampling
differs (torch's antialiased bicubic on uint8 instead of PIL's), by a few
grey levels at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pfedmoap_cli.compat import import_torchvision


@dataclass(frozen=True)
class AugmentSettings:
    """What the training augmentation needs to know.

    Attributes
    ----------
    image_size:
        Side of the square output (the model's input size).
    mean, std:
        Per-channel normalisation of the model's preprocess config.
    scale, ratio:
        RandomResizedCrop's range of area fractions and of aspect ratios (w / h).
    flip_probability:
        Chance of a horizontal flip.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_probability: float = 0.5


@dataclass(frozen=True)
class CropBox:
    """A crop of an image: its top-left corner and its size, in pixels."""

    top: int
    left: int
    height: int
    width: int


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator) -> CropBox:
    """The crop RandomResizedCrop takes of a ``height`` x ``width`` image, drawn from ``generator``.

    Draw for draw torchvision's ``RandomResizedCrop.get_params`` (the same
    tensor calls, with ``generator=`` added): up to 10 tries of an area
    fraction uniform in ``scale`` and a log aspect ratio uniform in
    ``log(ratio)``, the first box that fits wins, with its corner uniform over
    the positions where it fits; if none fits, the central crop, its aspect
    ratio clamped to ``ratio``.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return CropBox(top, left, h, w)
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def draw_flip(probability: float, generator: torch.Generator) -> bool:
    """Whether to flip, drawn as ``RandomHorizontalFlip`` draws it (one ``rand(1)``)."""
    return bool(torch.rand(1, generator=generator).item() < probability)


class TensorAugment:
    """The training augmentation of a batch of decoded images, run on ``device``.

    Call it with uint8 images (3, H_i, W_i) of any sizes (on the CPU) and a
    CPU generator; it returns float32 (B, 3, S, S) on ``device``. The random
    draws are made on the CPU, one image after the other (crop, then flip),
    so they do not depend on the device or the batch size.
    """

    def __init__(self, settings: AugmentSettings, device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.device = torch.device(device)
        self._mean = torch.tensor(settings.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(settings.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        tv = import_torchvision()
        from torchvision.transforms.v2 import functional as tv_functional

        self._resize = tv_functional.resize
        self._bicubic = tv.transforms.InterpolationMode.BICUBIC

    def draw(self, images: Sequence[torch.Tensor], generator: torch.Generator) -> list[tuple[CropBox, bool]]:
        """The crop and flip of each image, in order (what :meth:`__call__` applies)."""
        s = self.settings
        return [(crop_box(int(im.shape[-2]), int(im.shape[-1]), s.scale, s.ratio, generator), draw_flip(s.flip_probability, generator)) for im in images]

    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Augmented, normalised float32 batch (B, 3, S, S) on the device."""
        return self.apply(images, self.draw(images, generator))

    def apply(self, images: Sequence[torch.Tensor], draws: Sequence[tuple[CropBox, bool]]) -> torch.Tensor:
        """Crop, resize, flip and normalise ``images`` as ``draws`` say (no random draws)."""
        size = [self.settings.image_size, self.settings.image_size]
        resized = []
        for image, (box, _) in zip(images, draws):
            crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
            # uint8 in, uint8 out (rounded and clipped), as PIL resizes: the
            # bicubic overshoot is clipped to 0..255 the same way.
            # A contiguous crop resizes 10-20% faster than the strided view.
            crop = crop.to(self.device, non_blocking=True).contiguous()
            resized.append(self._resize(crop, size, interpolation=self._bicubic, antialias=True))
        batch = torch.stack(resized)
        flips = torch.tensor([flip for _, flip in draws], dtype=torch.bool, device=self.device)
        batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
        return (batch.to(torch.float32).div_(255.0) - self._mean) / self._std

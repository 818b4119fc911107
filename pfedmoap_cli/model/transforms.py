"""CLIP image transforms (PROTOCOL.md section 1).

Built from torchvision directly rather than open_clip's ``image_transform`` so
the pipeline is exactly the one the protocol names, and so it has a stable,
readable description for cache keys.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from pfedmoap_cli.compat import import_torchvision


def _to_rgb(image: Image.Image) -> Image.Image:
    # Module-level (not a lambda) so DataLoader workers can pickle the transform.
    return image if image.mode == "RGB" else image.convert("RGB")


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{float(v):.8g}" for v in values)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip + ToTensor + normalise."""
    T = import_torchvision().transforms
    return T.Compose(
        [
            _to_rgb,
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


def test_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize(bicubic) + CenterCrop + ToTensor + normalise: open_clip's eval preprocess."""
    T = import_torchvision().transforms
    return T.Compose(
        [
            _to_rgb,
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


def test_transform_id(image_size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """Stable description of :func:`test_transform` (bump ``v1`` if the pipeline changes)."""
    return f"test-v1:resize{image_size}-bicubic:center{image_size}:mean={_fmt(mean)}:std={_fmt(std)}"

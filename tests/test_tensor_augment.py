"""The tensor augmentation draws torchvision's crops and flips and resamples like PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pfedmoap_cli.compat import import_torchvision
from pfedmoap_cli.model.tensor_augment import AugmentSettings, CropBox, TensorAugment, crop_box
from pfedmoap_cli.model.transforms import train_transform

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photograph-like uint8 RGB image (H, W, 3): smooth colour fields, no pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("height,width", [(375, 500), (32, 32), (500, 120), (7, 900)])
def test_crop_boxes_are_torchvision_draws(height, width):
    """Same seed, same boxes as RandomResizedCrop.get_params on the global RNG (so the same distribution)."""
    T = import_torchvision().transforms
    image = Image.new("RGB", (width, height))
    for seed in range(200):
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO))
        assert crop_box(height, width, SCALE, RATIO, generator(seed)) == CropBox(i, j, h, w), seed


def test_crop_boxes_stay_in_bounds_and_ranges():
    """Boxes fit the image, their area and aspect ratio within the ranges (up to rounding)."""
    g = generator(5)
    height, width = 375, 500
    for _ in range(2000):
        box = crop_box(height, width, SCALE, RATIO, g)
        assert 0 <= box.top and box.top + box.height <= height
        assert 0 <= box.left and box.left + box.width <= width
        area = box.height * box.width / (height * width)
        assert 0.08 * 0.97 <= area <= 1.0
        assert 0.75 * 0.97 <= box.width / box.height <= 4 / 3 * 1.03


def test_fallback_is_the_central_crop_clamped_to_the_ratio():
    # A 900 x 7 strip: no box of aspect ratio <= 4/3 and 8% of the area fits in 10 tries.
    assert crop_box(7, 900, SCALE, RATIO, generator(0)) == CropBox(0, (900 - 9) // 2, 7, 9)  # w = round(7 * 4/3)
    # A tall strip: the width is kept, the height is round(w / (3/4)).
    assert crop_box(900, 7, SCALE, RATIO, generator(0)) == CropBox((900 - 9) // 2, 0, 9, 7)


def test_draws_crop_then_flip_per_image_like_the_pil_transform():
    """The sequence of (box, flip) equals torchvision's draws: per image, the crop's draws then one rand(1)."""
    T = import_torchvision().transforms
    augment = TensorAugment(AugmentSettings(32, MEAN, STD))
    images = [torch.zeros(3, 40 + 7 * k, 60 - 3 * k, dtype=torch.uint8) for k in range(8)]
    draws = augment.draw(images, generator(11))
    torch.manual_seed(11)
    expected = []
    for image in images:
        box = CropBox(*T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)))
        expected.append((box, bool(torch.rand(1) < 0.5)))
    assert draws == expected
    assert {flip for _, flip in draws} == {True, False}


def test_full_image_without_flip_matches_pil_resize_and_normalise():
    """A no-op crop: the output is PIL's bicubic resize, to [0, 1], normalised, within 2 grey levels."""
    pixels = smooth_image(375, 500, seed=3)
    augment = TensorAugment(AugmentSettings(224, MEAN, STD))
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
    out = augment.apply([tensor], [(CropBox(0, 0, 375, 500), False)])[0]
    resized = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (resized - np.array(MEAN)) / np.array(STD)
    got = out.permute(1, 2, 0).double().numpy()
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    grey_levels = np.abs(got - expected) * np.array(STD) * 255.0
    assert grey_levels.max() <= 2.01  # PIL and torch round their bicubic sums differently
    assert grey_levels.mean() < 0.05


def test_flip_mirrors_the_crop_exactly():
    augment = TensorAugment(AugmentSettings(32, MEAN, STD))
    image = torch.from_numpy(smooth_image(60, 80, seed=1).copy()).permute(2, 0, 1).contiguous()
    box = CropBox(5, 9, 40, 50)
    plain, flipped = augment.apply([image, image], [(box, False), (box, True)])
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_whole_pipeline_equals_the_pil_transform_for_the_same_seed():
    """Generator seeded as the PIL path seeds the global RNG: same crops and flips, PIL-like pixels."""
    images = [smooth_image(120 + 13 * k, 160 - 9 * k, seed=k) for k in range(6)]
    transform = train_transform(48, MEAN, STD)
    torch.manual_seed(123)
    expected = torch.stack([transform(Image.fromarray(p)) for p in images])
    augment = TensorAugment(AugmentSettings(48, MEAN, STD))
    got = augment([torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous() for p in images], generator(123))
    grey_levels = (got - expected).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert grey_levels.max() <= 2.01  # PIL and torch round their bicubic sums differently
    assert grey_levels.mean() < 0.05
    # a different seed gives other crops: far from the PIL batch
    other = augment([torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous() for p in images], generator(124))
    assert ((other - expected).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).mean() > 5


def test_the_global_rng_is_not_touched():
    augment = TensorAugment(AugmentSettings(32, MEAN, STD))
    images = [torch.zeros(3, 50, 40, dtype=torch.uint8)] * 4
    torch.manual_seed(0)
    before = torch.get_rng_state()
    augment(images, generator(1))
    assert torch.equal(torch.get_rng_state(), before)

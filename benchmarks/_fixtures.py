"""What the benchmarks run on: a fake Flowers102 in CoOp's layout and a 224-px tiny CLIP.

Shared by ``bench_round.py`` and the smoke test; nothing here is timed.

The fake dataset has the real one's shape where it matters for speed: 102
classes, JPEG files decoded by the same :class:`Flowers102Source` as the real
data, CoOp's split-file format, ``shots`` training images per class and
``test_per_class`` test images per class. Pixels are smooth random colour
fields with a little grain, so the JPEGs decode at a realistic cost (flat
images would compress to almost nothing and decode unrealistically fast).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: open_clip name of the benchmark backbone (benchmarks/configs/bench-vit-224.json):
#: a ViT at CLIP's real 224-px input (patch 32, width 64, 2 layers; text width 64,
#: 2 layers; D = 32), so image decoding and augmentation cost what they cost at
#: Table 1's resolution while the network itself stays cheap.
BENCH_VIT = "bench-vit-224"
CONFIG_DIR = Path(__file__).parent / "configs"

# What Flowers102Source reads (pfedmoap_cli/data/sources/flowers102.py).
FLOWERS_FOLDER = "oxford_flowers"
FLOWERS_IMAGE_DIR = "jpg"
FLOWERS_SPLIT_FILE = "split_zhou_OxfordFlowers.json"
FLOWERS_CLASSES = 102


def register_bench_models() -> None:
    """Make :data:`BENCH_VIT` known to open_clip in this process (the package's own tiny ones too)."""
    from pfedmoap_cli.compat import import_open_clip
    from pfedmoap_cli.model.backbone import register_tiny_configs

    register_tiny_configs()
    open_clip = import_open_clip()
    if open_clip.get_model_config(BENCH_VIT) is None:
        open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class FakeFlowers:
    """Size of a fake Flowers102.

    Attributes
    ----------
    shots:
        Training images per class (the partition takes this many per owned class).
    test_per_class:
        Test images per class (8 gives 816, a third of CoOp's 2,463).
    image_size:
        Side of the square JPEGs in pixels (224, or 500 for about the real photos' size).
    seed:
        Seed of the pixels.
    """

    shots: int = 16
    test_per_class: int = 8
    image_size: int = 224
    seed: int = 0

    @property
    def num_train(self) -> int:
        return FLOWERS_CLASSES * self.shots

    @property
    def num_test(self) -> int:
        return FLOWERS_CLASSES * self.test_per_class


def _fake_photo(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A smooth colour field tinted by the class, with grain: JPEG-compressible like a photo, not flat."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    coarse[..., label % 3] = np.maximum(coarse[..., label % 3], 128)
    image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
    grain = rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def write_fake_flowers(data_root: Path, size: FakeFlowers) -> Path:
    """Write ``<data_root>/oxford_flowers`` (JPEGs and CoOp's split file); return that folder.

    Files are named like the real ones (``jpg/image_00001.jpg``); the split
    file's ``val`` list is empty (the loader does not use it).
    """
    base = Path(data_root) / FLOWERS_FOLDER
    (base / FLOWERS_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size.seed)
    lists: dict[str, list] = {"train": [], "val": [], "test": []}
    number = 0
    for label in range(FLOWERS_CLASSES):
        name = f"flower {label:03d}"
        for index in range(size.shots + size.test_per_class):
            number += 1
            rel = f"image_{number:05d}.jpg"
            _fake_photo(rng, label, size.image_size).save(base / FLOWERS_IMAGE_DIR / rel, quality=90)
            lists["train" if index < size.shots else "test"].append([rel, label, name])
    (base / FLOWERS_SPLIT_FILE).write_text(json.dumps(lists), encoding="utf-8")
    return base

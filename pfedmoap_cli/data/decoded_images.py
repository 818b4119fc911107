"""Training images decoded once per process, kept as uint8 tensors in memory or on disk.

The PIL path decodes every training image from its file in every epoch of
every round; a client of a Table-1 run decodes each of its images 5 times a
round. :class:`DecodedImageStore` decodes an image the first time it is asked
for and keeps the (3, H, W) uint8 tensor:

* in memory, up to ``memory_mb`` MiB, least recently used first out (a
  round trains its clients one after the other, each for several epochs over
  its own images, so the images used last are the ones used next);
* an image pushed out of memory is spilled to an on-disk cache (by default
  ``<workspace>/cache/images/``), read back from there when it is asked for
  again: one file read instead of a decode.

Disk entries are named by a content hash of the dataset's fingerprint, the
split, the sample's key, the downscale cap and a schema version (as the test
feature cache is, :mod:`pfedmoap_cli.model.features`), written atomically,
and carry the sha256 of their pixels, checked on every read: a damaged entry
is decoded again and rewritten, with one line on stderr.

Downscaling: an image whose shorter side exceeds ``max_short_side`` is stored
once resized (PIL bicubic, antialiased) so that its shorter side is
``max_short_side``, which bounds memory and disk for large photographs. The
engine sets the cap to twice the model's input size; RandomResizedCrop then
crops the smaller image, which moves the distribution of its crops very
slightly (crop boxes are rounded to the smaller pixel grid, and a crop is
resampled twice). Images at or under the cap (all of the synthetic world's,
and a 500 x 375 photograph under a 224 px model) are stored untouched.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pfedmoap_cli.artifacts.atomic import sha256_json
from pfedmoap_cli.artifacts.checked_tensor import read_checked_tensor, write_checked_tensor
from pfedmoap_cli.data.sources.base import DatasetSource, Sample

CACHE_SCHEMA = "pfedmoap-decoded-image/1"
TENSOR_NAME = "image"


@dataclass(frozen=True)
class DecodedImageSettings:
    """How much a :class:`DecodedImageStore` keeps where.

    Attributes
    ----------
    memory_mb:
        MiB of decoded pixels kept in memory (``--image-cache-mb``); 0 keeps
        none, every image then comes from the disk cache after its first decode.
    max_short_side:
        Images whose shorter side is longer are stored downscaled to it; None
        stores every image at its own size.
    """

    memory_mb: int = 2048
    max_short_side: int | None = None


@dataclass
class StoreCounts:
    """What a store did (for tests, benchmarks and curious users)."""

    decoded: int = 0
    memory_hits: int = 0
    disk_reads: int = 0
    spilled: int = 0
    damaged: int = 0


def decode_rgb(source: DatasetSource, sample: Sample, max_short_side: int | None) -> torch.Tensor:
    """``sample``'s image as a contiguous uint8 tensor (3, H, W), RGB, downscaled to ``max_short_side`` if larger."""
    image = source.load_image(sample)
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    short = min(width, height)
    if max_short_side is not None and short > max_short_side:
        if width <= height:
            size = (max_short_side, max(1, round(height * max_short_side / width)))
        else:
            size = (max(1, round(width * max_short_side / height)), max_short_side)
        image = image.resize(size, Image.BICUBIC)  # PIL widens the kernel when shrinking: antialiased
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass
class DecodedImageStore:
    """Decoded uint8 images (3, H, W) of ``samples``, by index, decoded once per process.

    Parameters
    ----------
    source:
        The dataset (its ``load_image`` decodes, its ``fingerprint`` keys the disk cache).
    samples:
        The split's samples; :meth:`image` takes indices into this list.
    cache_dir:
        Folder of the on-disk cache (created when the first image spills).
    settings:
        Memory budget and downscale cap.
    split:
        The split the samples come from (part of the disk key).
    """

    source: DatasetSource
    samples: Sequence[Sample]
    cache_dir: Path
    settings: DecodedImageSettings = field(default_factory=DecodedImageSettings)
    split: str = "train"
    counts: StoreCounts = field(default_factory=StoreCounts)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        self._memory: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._memory_bytes = 0
        self._on_disk: set[int] = set()  # entries this process wrote or verified
        self._keys: dict[int, str] = {}
        self._dataset = self.source.fingerprint()

    @property
    def memory_budget(self) -> int:
        """Bytes of pixels kept in memory at most."""
        return self.settings.memory_mb * 2**20

    @property
    def memory_bytes(self) -> int:
        """Bytes of pixels in memory now."""
        return self._memory_bytes

    def entry_key(self, index: int) -> str:
        """Content hash naming sample ``index``'s decoded image on disk."""
        key = self._keys.get(index)
        if key is None:
            key = self._keys[index] = self._hash_key(index)
        return key

    def _hash_key(self, index: int) -> str:
        return sha256_json(
            {
                "schema": CACHE_SCHEMA,
                "dataset": self._dataset,
                "split": self.split,
                "sample": self.samples[index].key,
                "max_short_side": self.settings.max_short_side,
            }
        )

    def entry_path(self, index: int) -> Path:
        """Where sample ``index``'s decoded image is (or would be) on disk."""
        key = self.entry_key(index)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def image(self, index: int) -> torch.Tensor:
        """Sample ``index``'s decoded image, uint8 (3, H, W) on the CPU. Do not modify it in place."""
        cached = self._memory.get(index)
        if cached is not None:
            self._memory.move_to_end(index)
            self.counts.memory_hits += 1
            return cached
        image, damaged = self._read_disk(index)
        if image is None:
            image = decode_rgb(self.source, self.samples[index], self.settings.max_short_side)
            self.counts.decoded += 1
            if damaged:
                self._write_disk(index, image)  # replace the damaged entry at once, whether or not it spills
        self._keep(index, image)
        return image

    def _keep(self, index: int, image: torch.Tensor) -> None:
        """Put ``image`` in memory, spilling the least recently used images that no longer fit."""
        size = image.numel() * image.element_size()
        if size > self.memory_budget:
            self._spill(index, image)
            return
        while self._memory and self._memory_bytes + size > self.memory_budget:
            old_index, old_image = self._memory.popitem(last=False)
            self._memory_bytes -= old_image.numel() * old_image.element_size()
            self._spill(old_index, old_image)
        self._memory[index] = image
        self._memory_bytes += size

    def _spill(self, index: int, image: torch.Tensor) -> None:
        if index not in self._on_disk:
            self._write_disk(index, image)
            self.counts.spilled += 1

    def _write_disk(self, index: int, image: torch.Tensor) -> None:
        write_checked_tensor(self.entry_path(index), TENSOR_NAME, image, {"schema": CACHE_SCHEMA, "key": self.entry_key(index)})
        self._on_disk.add(index)

    def _read_disk(self, index: int) -> tuple[torch.Tensor | None, bool]:
        """``(image, False)`` from a sound disk entry; ``(None, damaged)`` otherwise (a notice when damaged)."""
        path = self.entry_path(index)
        if not path.is_file():
            self._on_disk.discard(index)
            return None, False
        image, problem = read_checked_tensor(
            path, TENSOR_NAME, self.entry_key(index), lambda t: t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == 3, "this image"
        )
        if problem is not None:
            self.counts.damaged += 1
            self._on_disk.discard(index)
            print(f"decoded image cache entry {path} {problem}; decoded the image again", file=sys.stderr, flush=True)
            return None, True
        self.counts.disk_reads += 1
        self._on_disk.add(index)
        return image, False

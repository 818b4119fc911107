"""Client datasets: training batches with augmentation, and cached test features."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from pfedmoap_cli.data.sources.base import DatasetSource, Sample


class ClientTrainImages(Dataset):
    """A client's training images, transformed on the fly (PIL -> tensor)."""

    def __init__(self, source: DatasetSource, samples: Sequence[Sample], indices: Sequence[int], transform: Callable) -> None:
        self.source = source
        self.samples = [samples[i] for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[position]
        return self.transform(self.source.load_image(sample)), sample.label


def epoch_batches(
    dataset: ClientTrainImages,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    num_workers: int = 0,
    shuffle: bool = True,
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function yielding one epoch of (images, labels) on ``device`` per call.

    The shuffle order comes from ``generator`` (which the DataLoader also
    draws its base seed from: without one it would draw from the GLOBAL torch
    RNG, which seeds augmentation). Augmentation draws from the global torch
    RNG, seeded by the engine per (round, client); with worker processes each
    worker's RNG is seeded from ``generator`` instead, which is just as
    reproducible but gives other draws (so ``num_workers`` is part of a run's
    identity).
    """

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return batches


def ordered_batches(
    dataset: ClientTrainImages, batch_size: int, device: torch.device, num_workers: int = 0
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function yielding the whole ``dataset`` once, in index order, per call.

    No shuffling and no draw from any shared random stream (a private
    generator): meant for a deterministic transform (the test transform), so
    the same images give the same batches every time and nothing else's
    random draws move.
    """
    return epoch_batches(dataset, batch_size, torch.Generator(), device, num_workers, shuffle=False)

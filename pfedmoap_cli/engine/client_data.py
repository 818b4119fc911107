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
    dataset: ClientTrainImages, batch_size: int, generator: torch.Generator, device: torch.device
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function yielding one shuffled epoch of (images, labels) on ``device`` per call.

    The shuffle order comes from ``generator`` and the augmentation from the
    global torch RNG, both seeded by the engine per (round, client).
    """

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return batches

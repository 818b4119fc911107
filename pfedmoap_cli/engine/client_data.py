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
    augment_seed: int | None = None,
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function yielding one epoch of (images, labels) on ``device`` per call.

    The shuffle order comes from ``generator`` (which the DataLoader also
    draws its base seed from: without one it would draw from the GLOBAL torch
    RNG, which seeds augmentation). Augmentation draws from the global torch
    RNG, seeded by the engine per (round, client); with worker processes each
    worker's RNG is seeded from ``generator`` instead, which is just as
    reproducible but gives other draws (so ``num_workers`` is part of a run's
    identity).

    With ``augment_seed``, those augmentation draws come from a private copy
    of the global torch RNG seeded with it, carried from batch to batch and
    epoch to epoch, and swapped in only while a batch is being made: the
    batches are then exactly those the global RNG, seeded with
    ``augment_seed`` and used by nothing else, would give, however the
    caller interleaves them with other clients' batches (lock-step rounds,
    :mod:`pfedmoap_cli.engine.batched_round`) and whatever else draws from
    the global RNG meanwhile.
    """
    isolation = _PrivateRng(augment_seed) if augment_seed is not None else None

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isolation is not None:
            return isolation.drive(loaded())
        return loaded()

    def loaded() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


class _PrivateRng:
    """A CPU torch RNG stream of its own, lent to the global RNG one ``next()`` at a time."""

    def __init__(self, seed: int) -> None:
        # The state torch.manual_seed(seed) gives the global CPU generator,
        # made without touching the caller's streams (CPU or CUDA).
        self.state = torch.Generator().manual_seed(seed).get_state()

    def drive(self, iterator: Iterator) -> Iterator:
        """Yield ``iterator``'s items, each made with this stream swapped into the global RNG."""
        while True:
            caller = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(caller)
            yield item


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

"""A client's training epochs from decoded images, augmented as tensors (``--image-pipeline tensor``).

The contract of :func:`pfedmoap_cli.engine.client_data.epoch_batches`: each
call yields one shuffled, augmented epoch of (images, labels) on the device.
The sample order is the one a ``DataLoader(shuffle=True, generator=g)`` gives
for the same generator ``g``, draw for draw, so both pipelines see a client's
images in the same order; augmentation comes from its own generator, never
from the global torch RNG, so nothing else in the process (another client's
batches in a lock-step round, dropout) can move it.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import torch

from pfedmoap_cli.data.decoded_images import DecodedImageStore
from pfedmoap_cli.model.tensor_augment import TensorAugment

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _random_sampler(count: int, generator: torch.Generator) -> Iterator[int]:
    """``RandomSampler(range(count), generator=generator)``'s draws, in its order and at its times.

    A permutation of the positions; then, when it runs out, a second
    permutation cut to ``count % count`` = 0 items, which is drawn all the
    same and so moves the generator for the next epoch.
    """
    yield from torch.randperm(count, generator=generator).tolist()
    yield from torch.randperm(count, generator=generator).tolist()[:0]


def dataloader_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """The positions of each batch of one epoch of ``DataLoader(range(count), batch_size, shuffle=True, generator=generator)``.

    Draw for draw what the DataLoader takes from ``generator``: starting the
    epoch, its iterator draws its workers' base seed (one int64, drawn even
    without workers); its RandomSampler then draws as :func:`_random_sampler`,
    batched as its BatchSampler batches (``drop_last=False``). The generator
    is left where the DataLoader would leave it, so later epochs match too.
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    positions = _random_sampler(count, generator)
    batch = list(itertools.islice(positions, batch_size))
    while batch:
        yield batch
        batch = list(itertools.islice(positions, batch_size))


def decoded_epoch_batches(
    store: DecodedImageStore,
    indices: Sequence[int],
    labels: Sequence[int],
    batch_size: int,
    shuffle_generator: torch.Generator,
    augment_generator: torch.Generator,
    device: torch.device,
    augment: TensorAugment,
) -> Batches:
    """A function yielding one epoch of (images, labels) on ``device`` per call.

    Parameters
    ----------
    store:
        The decoded images; ``indices`` index into its samples.
    indices, labels:
        The client's training samples and their labels (same length).
    batch_size:
        Images per batch; the last batch of an epoch may be smaller (as the
        DataLoader's default ``drop_last=False``).
    shuffle_generator:
        The sample order's stream (see :func:`dataloader_batches`).
    augment_generator:
        The augmentation's stream, carried from batch to batch and epoch to
        epoch (a generator seeded with the value the PIL path gives to
        ``torch.manual_seed`` draws the same crops and flips).
    device:
        Where the batches go.
    augment:
        The augmentation (:class:`TensorAugment`, normally on ``device``).
    """
    if len(indices) != len(labels):
        raise ValueError(f"{len(indices)} training images but {len(labels)} labels")
    indices, labels = list(indices), list(labels)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not indices:
            return
        for positions in dataloader_batches(len(indices), batch_size, shuffle_generator):
            images = augment([store.image(indices[p]) for p in positions], augment_generator)
            targets = torch.tensor([labels[p] for p in positions], dtype=torch.long)
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return batches

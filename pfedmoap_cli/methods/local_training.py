"""The local optimisation loop shared by the prompt-learning methods.

SGD with momentum and coupled weight decay, a fresh optimiser for every
client in every round, and a cosine schedule over the round's local epochs
that restarts each round (PROTOCOL.md section 2). The same loop for all of a
round's clients at once, in lock step, is
:func:`pfedmoap_cli.engine.batched_round.run_local_epochs_batched`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from pfedmoap_cli.methods.base import Batches, LocalTraining


def cosine_factor(epoch: int, total_epochs: int) -> float:
    """Learning-rate multiplier of epoch ``epoch`` (0-based) under cosine annealing to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


def run_local_epochs(
    batches: Batches,
    param_groups: list[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    training: LocalTraining,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    epochs: int | None = None,
) -> float:
    """Train the parameters in ``param_groups`` for the round's local epochs.

    Parameters
    ----------
    batches:
        Returns an iterable of (images, labels) for one epoch.
    param_groups:
        Optimiser groups; a group with ``"cosine": True`` follows the cosine
        schedule, others keep their learning rate constant.
    loss_fn:
        Maps (normalised image features, labels) to the scalar loss.
    training:
        Optimiser settings.
    encode_images:
        The frozen image encoder (features carry no gradient).
    epochs:
        Overrides ``training.local_epochs``.

    Returns
    -------
    float
        Mean training loss over the last epoch.
    """
    total = epochs if epochs is not None else training.local_epochs
    groups = [{k: v for k, v in g.items() if k != "cosine"} for g in param_groups]
    optimizer = torch.optim.SGD(groups, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    cosine = [bool(g.get("cosine", False)) for g in param_groups]
    last_epoch_loss = float("nan")
    for epoch in range(total):
        for group, base_lr, follows in zip(optimizer.param_groups, base_lrs, cosine):
            group["lr"] = base_lr * cosine_factor(epoch, total) if follows else base_lr
        loss_sum, count = 0.0, 0
        for images, labels in batches():
            features = encode_images(images)
            loss = loss_fn(features, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            count += len(labels)
        last_epoch_loss = loss_sum / max(count, 1)
    return last_epoch_loss


def prompt_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP logits ``s * I T^T`` for normalised features."""
    return logit_scale * image_features @ text_features.t()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (a named function so methods read as their formulas)."""
    return F.cross_entropy(logits, labels)


def weighted_average(tensors: Iterable[torch.Tensor], weights: Iterable[float]) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` (FedAvg) computed in float64 for stability."""
    tensors, weights = list(tensors), [float(w) for w in weights]
    total = sum(weights)
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        acc += tensor.to(torch.float64) * weight
    return (acc / total).to(tensors[0].dtype)

"""Scoring every client on its own test set after a round (PROTOCOL.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfedmoap_cli.methods.base import ClientEvaluator


@dataclass(frozen=True)
class ClientScore:
    """Test results of one client in one round."""

    client_id: int
    accuracy: float
    loss: float
    num_examples: int
    extra: dict[str, float]


def score_client(
    evaluator: ClientEvaluator,
    client_id: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
) -> ClientScore:
    """Top-1 accuracy (argmax over all classes) and mean cross-entropy of one client."""
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            chunk, truth = features[start : start + batch_size], labels[start : start + batch_size]
            logits = evaluator.logits(client_id, chunk).float()
            correct += int((logits.argmax(dim=1) == truth).sum())
            loss_sum += float(F.cross_entropy(logits, truth, reduction="sum"))
        extra = evaluator.extra_metrics(client_id, features)
    count = len(labels)
    return ClientScore(client_id, correct / count, loss_sum / count, count, extra)

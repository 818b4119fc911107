"""The numbers a tracker logs for one round, computed from the round's metric rows.

Names (the same in every tracker):

* ``accuracy/mean``: test accuracy averaged over the clients scored (what
  ``train`` prints and the tables report); this and the other test scalars
  only in rounds that scored the clients (``--eval-every``);
* ``accuracy/weighted``: test accuracy weighted by each client's test images;
* ``accuracy/client_NNNN``: each client's test accuracy;
* ``loss/test_mean``: test loss averaged over clients;
* ``loss/train_mean``: train loss averaged over the round's participants;
* ``bytes/down_total``, ``bytes/up_total``: traffic of the round, summed over participants;
* ``clients/participants``: participants whose update arrived (logged every round);
* ``clients/missing``: clients recorded missing (train or test); ``clients/missing_train``
  and ``clients/missing_test`` split it;
* ``extra/<metric>``: any other test metric (pFedMoAP's ``attention_cNNNN``: the mean
  attention weight expert NNNN received), averaged over the clients that report it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from pfedmoap_cli.artifacts.metrics import MetricRow

MISSING = "missing"  # engine.recorder.MISSING_METRIC (not imported: it pulls in torch)
_MAIN_TEST = {"accuracy", "loss", MISSING}
_TRAIN_SUMS = {"bytes_down": "bytes/down_total", "bytes_up": "bytes/up_total"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def client_accuracies(rows: Iterable[MetricRow]) -> dict[int, float]:
    """Each scored client's test accuracy, by client id."""
    return {r.client_id: r.value for r in rows if r.split == "test" and r.metric == "accuracy"}


def round_scalars(rows: Iterable[MetricRow]) -> dict[str, float]:
    """The scalars of one round (see the module docstring); metrics without rows are left out."""
    rows = list(rows)
    out: dict[str, float] = {}
    test_acc = [r for r in rows if r.split == "test" and r.metric == "accuracy"]
    if test_acc:
        out["accuracy/mean"] = _mean([r.value for r in test_acc])
        examples = sum(r.num_examples for r in test_acc)
        if examples > 0:
            out["accuracy/weighted"] = sum(r.value * r.num_examples for r in test_acc) / examples
        for r in sorted(test_acc, key=lambda r: r.client_id):
            out[f"accuracy/client_{r.client_id:04d}"] = r.value
    test_loss = [r.value for r in rows if r.split == "test" and r.metric == "loss"]
    if test_loss:
        out["loss/test_mean"] = _mean(test_loss)
    train_loss = [r for r in rows if r.split == "train" and r.metric == "loss"]
    if train_loss:
        out["loss/train_mean"] = _mean([r.value for r in train_loss])
    out["clients/participants"] = float(len({r.client_id for r in train_loss}))
    for metric, name in _TRAIN_SUMS.items():
        values = [r.value for r in rows if r.split == "train" and r.metric == metric]
        if values:
            out[name] = float(sum(values))
    missing = {split: {r.client_id for r in rows if r.split == split and r.metric == MISSING} for split in ("train", "test")}
    out["clients/missing"] = float(len(missing["train"] | missing["test"]))
    out["clients/missing_train"] = float(len(missing["train"]))
    out["clients/missing_test"] = float(len(missing["test"]))
    extras: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.split == "test" and r.metric not in _MAIN_TEST:
            extras[r.metric].append(r.value)
    for metric, values in sorted(extras.items()):
        out[f"extra/{metric}"] = _mean(values)
    return out

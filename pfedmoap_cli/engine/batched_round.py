"""A round's clients trained in lock step, as one batched computation.

The per-client path (:func:`pfedmoap_cli.methods.local_training.run_local_epochs`)
trains the sampled clients one after another. Here every trainable tensor has
a leading dimension with one row per client, and at each step every client
whose epoch still has a batch contributes one: their images go through ONE
image-encoder call, their losses are summed for ONE backward (the rows are
separate, so each row's gradient is its own client's), and SGD updates only
the rows of the clients that had a batch. Each client sees exactly the
batches, the optimiser and the schedule of the per-client path, so the two
agree within float rounding (PROTOCOL.md section 2).

This module imports nothing from :mod:`pfedmoap_cli.methods` at import time:
the methods import it, and importing it first must not start a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.methods.base import ClientJob, ClientResult, LocalTraining, State

#: Keys a parameter group may carry (those of run_local_epochs' groups).
_GROUP_KEYS = {"params", "lr", "cosine", "momentum", "weight_decay"}

LockStepLoss = Callable[[list[int], list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


@dataclass
class _RowSGD:
    """torch.optim.SGD (momentum, coupled weight decay, no dampening) applied to chosen rows.

    ``torch.optim.SGD`` updates whole tensors; a client without a batch at a
    step must get no decay and no momentum step, so the update is written out
    on the stacked tensors with the same elementwise operations in the same
    order (so that equal gradients give bit-equal parameters).
    """

    groups: list[dict]
    momentum_buffers: dict[int, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, lrs: Sequence[float]) -> None:
        """Update the parameter rows ``rows`` (client positions, ascending) of every group."""
        for group, lr in zip(self.groups, lrs):
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue  # as torch.optim.SGD: a parameter without gradient is left alone
                index = rows.to(param.device)
                weights = param.index_select(0, index)
                d_p = param.grad.index_select(0, index)
                if weight_decay != 0:
                    d_p = d_p.add(weights, alpha=weight_decay)
                if momentum != 0:
                    # torch starts a buffer as d_p at a row's first step; a zero
                    # buffer gives exactly that (momentum * 0 + d_p == d_p).
                    buffer = self.momentum_buffers.setdefault(id(param), torch.zeros_like(param))
                    d_p = buffer.index_select(0, index).mul(momentum).add(d_p)
                    buffer.index_copy_(0, index, d_p)
                param.index_copy_(0, index, weights.add(d_p, alpha=-lr))


def _optimizer_groups(param_groups: list[dict], training: LocalTraining, rows: int) -> list[dict]:
    """The groups with SGD's defaults filled in; every parameter checked for its client dimension."""
    groups = []
    for group in param_groups:
        unknown = set(group) - _GROUP_KEYS
        if unknown:
            raise ValueError(f"unsupported parameter-group keys for the batched optimiser: {sorted(unknown)}")
        params = list(group["params"])
        for param in params:
            if param.dim() == 0 or param.shape[0] != rows:
                raise ValueError(f"every batched parameter needs a leading dimension of {rows} (one row per client); got {tuple(param.shape)}")
        groups.append(
            {
                "params": params,
                "lr": group.get("lr", training.lr),
                "cosine": bool(group.get("cosine", False)),
                "momentum": group.get("momentum", training.momentum),
                "weight_decay": group.get("weight_decay", training.weight_decay),
            }
        )
    return groups


def run_local_epochs_batched(
    jobs: Sequence[ClientJob],
    param_groups: list[dict],
    loss_fn: LockStepLoss,
    training: LocalTraining,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    epochs: int | None = None,
) -> list[float]:
    """Train every job's rows of ``param_groups`` in lock step for the round's local epochs.

    The batched twin of :func:`~pfedmoap_cli.methods.local_training.run_local_epochs`.

    Parameters
    ----------
    jobs:
        The clients, one row each, in row order. Each job's ``batches`` must be
        RNG-isolated (the engine's are), since their iterators are interleaved.
    param_groups:
        As for ``run_local_epochs`` (``"cosine": True`` follows the cosine
        schedule); every parameter is a leaf tensor requiring grad whose
        leading dimension is ``len(jobs)``: row ``b`` belongs to ``jobs[b]``.
    loss_fn:
        ``(positions, features, labels) -> losses``: the positions (rows) of
        the clients that have a batch at this step, ascending; their
        normalised image features and labels, one tensor each; their mean
        losses, shape ``(len(positions),)``. Row ``b``'s loss may depend only
        on row ``b`` of the parameters.
    training:
        Optimiser settings (SGD with momentum and coupled weight decay).
    encode_images:
        The frozen image encoder; called once per step on all clients' images.
    epochs:
        Overrides ``training.local_epochs``.

    Returns
    -------
    list[float]
        Each job's mean training loss over its last epoch.
    """
    # Imported here: the methods import this module (see the module docstring).
    from pfedmoap_cli.methods.local_training import cosine_factor

    total = epochs if epochs is not None else training.local_epochs
    rows = len(jobs)
    groups = _optimizer_groups(param_groups, training, rows)
    optimizer = _RowSGD(groups)
    last_epoch_loss = [float("nan")] * rows
    for epoch in range(total):
        lrs = [g["lr"] * cosine_factor(epoch, total) if g["cosine"] else g["lr"] for g in groups]
        streams: list[Iterator] = [iter(job.batches()) for job in jobs]
        live = list(range(rows))
        loss_sum, count = [0.0] * rows, [0] * rows
        while live:
            positions, images, labels = [], [], []
            for position in live:
                batch = next(streams[position], None)
                if batch is not None:
                    positions.append(position)
                    images.append(batch[0])
                    labels.append(batch[1])
            live = positions  # a client whose epoch has ended waits for the next epoch
            if not positions:
                break
            features = list(encode_images(torch.cat(images)).split([len(x) for x in images]))
            losses = loss_fn(positions, features, labels)
            if tuple(losses.shape) != (len(positions),):
                raise ValueError(f"loss_fn must return one loss per client with a batch, shape ({len(positions)},); got {tuple(losses.shape)}")
            for group in groups:
                for param in group["params"]:
                    param.grad = None
            losses.sum().backward()
            optimizer.step(torch.tensor(positions, dtype=torch.long), lrs)
            for position, loss, batch_labels in zip(positions, losses.detach().tolist(), labels):
                loss_sum[position] += loss * len(batch_labels)
                count[position] += len(batch_labels)
        last_epoch_loss = [s / max(c, 1) for s, c in zip(loss_sum, count)]
    return last_epoch_loss


def _defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def has_batched_path(method_class: type) -> bool:
    """Whether ``method_class`` has a batched path written for the ``train_client`` it uses.

    A subclass that overrides ``train_client`` but inherits its parent's
    ``train_clients_batched`` (pFedPrompt from PromptFL, say) would get its
    parent's update in lock step instead of its own, so it has none.
    """
    from pfedmoap_cli.methods.base import FederatedMethod

    batched = _defining_class(method_class, "train_clients_batched")
    return batched is not FederatedMethod and issubclass(batched, _defining_class(method_class, "train_client"))


def train_participants(
    federation: Federation,
    round_index: int,
    participants: Sequence[int],
    start_state: State,
    client_states: Mapping[int, State],
) -> dict[int, ClientResult] | None:
    """The round's local updates as one lock-step computation, or None for client by client.

    Call it where ``Federation.run_round`` trains its participants (after
    ``method.prepare_round``). It builds each participant's job exactly as the
    per-client loop does (same :meth:`FederatedMethod.client_download`, same
    :meth:`Federation.client_job` seeds) and fills ``bytes_down``/``bytes_up``
    as :meth:`Federation.train_client` does. Clients are stacked in sorted
    order, so nothing depends on the order of ``participants``.

    Returns None when the run's settings say ``batched`` is off or the method
    has no batched path (:func:`has_batched_path`, or its hook returns None);
    the caller then trains client by client.
    """
    from pfedmoap_cli.methods.base import tensor_bytes

    method = federation.method
    if not getattr(federation.settings, "batched", False) or not method.trains or not has_batched_path(type(method)):
        return None  # decided before building jobs (they reseed the global RNG) for nothing
    order = sorted(participants)
    downloads = {cid: method.client_download(start_state, cid, round_index) for cid in order}
    jobs = [federation.client_job(cid, round_index, downloads[cid], client_states.get(cid)) for cid in order]
    results = method.train_clients_batched(jobs)
    if results is None:
        return None
    if len(results) != len(jobs):
        raise ValueError(f"method {method.name} returned {len(results)} batched results for {len(jobs)} clients")
    by_client = dict(zip(order, results))
    for cid, result in by_client.items():
        result.bytes_down, result.bytes_up = tensor_bytes(downloads[cid]), tensor_bytes(result.upload)
    return {cid: by_client[cid] for cid in participants}  # the caller's order, as its per-client loop would fill it

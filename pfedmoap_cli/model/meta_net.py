"""CoCoOp's meta-net: a two-layer bottleneck MLP from image features to a context shift.

Zhou et al., "Conditional Prompt Learning for Vision-Language Models" (CVPR
2022). The meta-net maps a normalised image feature ``f`` (D) to a token
``pi = h(f)`` (W, the text width) that is added to every context vector:

    h(f) = W_2 relu(W_1 f + b_1) + b_2,   W_1: (H, D), W_2: (W, H),  H = max(1, D // 16)

Its weights live in a plain state dict, like every other trainable tensor of
a method, so they can be averaged, checkpointed and sent without a module:
``{prefix}0.weight``, ``{prefix}0.bias`` (the first Linear) and
``{prefix}2.weight``, ``{prefix}2.bias`` (the second; index 1 is the ReLU, as
in an ``nn.Sequential``). :func:`meta_net_forward` applies them.

Initialisation (:func:`init_meta_net`): PyTorch's default ``nn.Linear``
initialisation, drawn with the given generator: every weight and bias of a
layer with ``fan_in`` inputs is uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``
(what ``kaiming_uniform_(a=sqrt(5))`` and the default bias init give). The
authors' code builds the meta-net with ``nn.Linear`` defaults, so this is the
same distribution, but reproducible from the experiment seed.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

#: The bottleneck ratio of CoCoOp's meta-net (hidden = D // 16).
REDUCTION = 16
DEFAULT_PREFIX = "meta."


def hidden_size(embed_dim: int) -> int:
    """The meta-net's hidden width ``max(1, D // 16)``."""
    return max(1, int(embed_dim) // REDUCTION)


def meta_net_keys(prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """The state keys of the meta-net, in a fixed order."""
    return tuple(f"{prefix}{layer}.{kind}" for layer in (0, 2) for kind in ("weight", "bias"))


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (values * 2.0 - 1.0) * bound


def init_meta_net(
    embed_dim: int,
    width: int,
    generator: torch.Generator,
    prefix: str = DEFAULT_PREFIX,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh meta-net weights ``Linear(D, H), ReLU, Linear(H, W)`` as a float32 state dict.

    Draws, in this order, ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``
    from ``generator`` (PyTorch's default Linear distribution, see the module
    docstring) and returns them on ``device`` (default: the generator's).
    """
    hidden = hidden_size(embed_dim)
    first, second = 1.0 / math.sqrt(int(embed_dim)), 1.0 / math.sqrt(hidden)
    shapes = [((hidden, int(embed_dim)), first), ((hidden,), first), ((int(width), hidden), second), ((int(width),), second)]
    state = {key: _uniform(shape, bound, generator) for key, (shape, bound) in zip(meta_net_keys(prefix), shapes)}
    if device is not None:
        state = {key: value.to(device) for key, value in state.items()}
    return state


def meta_net_forward(state: Mapping[str, torch.Tensor], features: torch.Tensor, prefix: str = DEFAULT_PREFIX) -> torch.Tensor:
    """``h(f)``: (B, D) image features -> (B, W) context shifts (differentiable in the state)."""
    w0, b0, w2, b2 = (state[key] for key in meta_net_keys(prefix))
    hidden = F.relu(F.linear(features.to(w0.dtype), w0, b0))
    return F.linear(hidden, w2, b2)

"""pFedMoAP's gating network: attention of an image over the experts' class features.

Luo, Chen, Wu, "Mixture of Experts Made Personalized: Federated Prompt
Learning for Vision-Language Models" (ICLR 2025). PROTOCOL.md section 2:

* ``pool(x) = x[..., ::r]`` with ``r = D / d_g`` -- every r-th coordinate of the
  already normalised feature, no averaging and no re-normalising;
* multi-head attention with four ``Linear(d_g, d_g)`` layers with bias (W_q, W_k,
  W_v, W_o), no dropout, no residual, no layer norm. For each class c the query
  is ``pool(I_b)`` and keys = values are the pooled class-c features of the
  K+1 experts, local expert first; scores are ``(Q K^T) * sigma`` (sigma replaces
  ``1/sqrt(d_k)``), a softmax over the experts, ``out = W_o(concat heads)``;
* ``logits = lambda * s * I T_local^T + s * <pool(I_b), T_MoE[b, c]>``, and just
  the local logits (no lambda) when there are no non-local experts.

All classes are handled at once (batched matmuls over classes, heads and experts).
:func:`batched_gating` is the same computation for G clients' networks at
once (stacked parameters, batched matmuls); the module runs it with G = 1.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from pfedmoap_cli.errors import ConfigError


def pool_stride(embed_dim: int, gating_dim: int) -> int:
    """``r = D / d_g``; a :class:`ConfigError` when ``d_g`` does not divide ``D``."""
    if gating_dim < 1 or embed_dim % gating_dim != 0:
        raise ConfigError(
            f"the gating width d_g={gating_dim} must divide the CLIP embedding width D={embed_dim}; "
            f"pass --method-option gating_dim=N with N a divisor of {embed_dim}"
        )
    return embed_dim // gating_dim


def pool_features(features: torch.Tensor, gating_dim: int) -> torch.Tensor:
    """``features[..., ::r]`` with ``r = D / d_g`` (D is the last dimension)."""
    return features[..., :: pool_stride(features.shape[-1], gating_dim)]


class GatingNetwork(torch.nn.Module):
    """Multi-head attention from pooled image features to pooled expert text features.

    Parameters
    ----------
    embed_dim:
        D, the width of the image and text features it reads.
    dim:
        d_g, the width after pooling and of every projection (128 in the paper).
    heads:
        Number of attention heads h; must divide ``dim``.
    scaling:
        sigma, the factor applied to ``Q K^T`` (10 in the paper).
    generator:
        Seeds the initialisation (torch's default ``Linear`` init:
        weights and biases ~ U(-1/sqrt(d_g), 1/sqrt(d_g))) without touching the
        global RNG. ``None`` uses torch's default init from the global RNG.
    """

    def __init__(self, embed_dim: int, dim: int = 128, heads: int = 8, scaling: float = 10.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.stride = pool_stride(embed_dim, dim)
        if heads < 1 or dim % heads != 0:
            raise ConfigError(f"gating_heads={heads} must divide gating_dim={dim}; pass --method-option gating_heads=N with N a divisor of {dim}")
        self.embed_dim, self.dim, self.heads, self.scaling = int(embed_dim), int(dim), int(heads), float(scaling)
        if generator is None:
            make = torch.nn.Linear
        else:  # skip the default init, which would draw from (and move) the global RNG
            make = lambda *shape: torch.nn.utils.skip_init(torch.nn.Linear, *shape)  # noqa: E731
        self.W_q, self.W_k, self.W_v, self.W_o = (make(dim, dim) for _ in range(4))
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """torch's default ``Linear`` init (kaiming_uniform with a=sqrt(5) = U(+-1/sqrt(fan_in)))."""
        bound = 1.0 / math.sqrt(self.dim)
        for layer in (self.W_q, self.W_k, self.W_v, self.W_o):
            for tensor in (layer.weight, layer.bias):
                draw = torch.empty(tensor.shape, dtype=torch.float32, device=generator.device)
                draw.uniform_(-bound, bound, generator=generator)
                tensor.copy_(draw.to(tensor.device, tensor.dtype))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``features[..., ::r]``."""
        if features.shape[-1] != self.embed_dim:
            raise ValueError(f"features of width {features.shape[-1]} given to a gating network built for D={self.embed_dim}")
        return features[..., :: self.stride]

    def forward(self, image_features: torch.Tensor, expert_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the experts' class features for every image.

        Parameters
        ----------
        image_features:
            (B, D) normalised image features.
        expert_features:
            (E, C, D) normalised class features of E = K+1 experts, local first.

        Returns
        -------
        (Tensor, Tensor)
            ``T_MoE`` (B, C, d_g) and the attention weights (B, h, C, E), which
            sum to 1 over the last dimension.
        """
        for features in (image_features, expert_features):
            if features.shape[-1] != self.embed_dim:
                raise ValueError(f"features of width {features.shape[-1]} given to a gating network built for D={self.embed_dim}")
        # One group of one client: the same code path as the batched training, so the two cannot drift apart.
        params = {name: tensor.unsqueeze(0) for name, tensor in self.named_parameters()}
        moe, attention = batched_gating(params, image_features.unsqueeze(0), expert_features.unsqueeze(0), self.heads, self.scaling)
        return moe[0], attention[0]


def _linear(params: Mapping[str, torch.Tensor], layer: str, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` for a group of G layers: x (G, N, d_g), weights (G, d_g, d_g), biases (G, d_g)."""
    return torch.baddbmm(params[f"{layer}.bias"].unsqueeze(1), x, params[f"{layer}.weight"].transpose(1, 2))


def batched_gating(
    params: Mapping[str, torch.Tensor],
    image_features: torch.Tensor,
    expert_features: torch.Tensor,
    heads: int,
    scaling: float,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`GatingNetwork.forward` for G gating networks at once, each on its own images and experts.

    Parameters
    ----------
    params:
        A :class:`GatingNetwork`'s parameter names (``W_q.weight``, ``W_q.bias``, ...)
        mapped to G stacked copies: weights (G, d_g, d_g), biases (G, d_g).
    image_features:
        (G, B, D) normalised image features (group g is scored by network g).
    expert_features:
        (G, E, C, D) class features of each group's E experts, local first.
    heads, scaling:
        h and sigma, as in :class:`GatingNetwork`.
    expert_mask:
        Optional (G, E) bool; False marks padding experts (groups with fewer
        experts than E), which get attention weight exactly 0.

    Returns
    -------
    (Tensor, Tensor)
        ``T_MoE`` (G, B, C, d_g) and the attention weights (G, B, h, C, E).
    """
    groups, batch = image_features.shape[:2]
    experts, classes = expert_features.shape[1:3]
    dim = params["W_q.weight"].shape[-1]
    head_dim = dim // heads
    # Layouts: per (group, class, head), keys (E, d_h) times queries (d_h, B) give
    # the scores as (E, B) -- experts NOT innermost, since a softmax over a short
    # (K+1) last dimension is several times slower than over a strided one -- and
    # the transposed weights (B, E) times values (E, d_h) mix them. Both are plain
    # batched matmuls (the transpose is a view), forward and backward.
    query = _linear(params, "W_q", pool_features(image_features, dim)).view(groups, batch, heads, head_dim)
    query = query.permute(0, 2, 3, 1).unsqueeze(1)  # (G, 1, h, d_h, B), broadcast over classes
    pooled = pool_features(expert_features, dim).reshape(groups, experts * classes, dim)
    key = _linear(params, "W_k", pooled).view(groups, experts, classes, heads, head_dim).permute(0, 2, 3, 1, 4)  # (G, C, h, E, d_h)
    value = _linear(params, "W_v", pooled).view(groups, experts, classes, heads, head_dim).permute(0, 2, 3, 1, 4)
    scores = torch.matmul(key, query) * scaling  # (G, C, h, E, B)
    if expert_mask is not None:
        scores = scores.masked_fill(~expert_mask.view(groups, 1, 1, experts, 1), float("-inf"))
    attention = scores.softmax(dim=3)
    mixed = torch.matmul(attention.transpose(-1, -2), value)  # (G, C, h, B, d_h)
    mixed = mixed.permute(0, 3, 1, 2, 4).reshape(groups, batch * classes, dim)
    moe = _linear(params, "W_o", mixed).view(groups, batch, classes, dim)
    return moe, attention.permute(0, 4, 2, 1, 3)


def mixture_logits(
    image_features: torch.Tensor,
    expert_features: torch.Tensor,
    gating: GatingNetwork | None,
    lam: float,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pFedMoAP's logits (B, C) and the gating's attention weights.

    Parameters
    ----------
    image_features:
        (B, D) normalised image features.
    expert_features:
        (E, C, D) class features of the local expert (index 0) and the K
        non-local experts; with E = 1 (no non-local expert) the result is the
        plain local logits ``s * I T_local^T`` with no lambda factor.
    gating:
        The client's gating network (unused, and may be ``None``, when E = 1).
    lam:
        lambda, the weight of the local logits.
    logit_scale:
        s = exp(CLIP's logit_scale).

    Returns
    -------
    (Tensor, Tensor or None)
        Logits and the attention weights (B, h, C, E), ``None`` without experts.
    """
    local_logits = logit_scale * image_features @ expert_features[0].t()
    if expert_features.shape[0] == 1:
        return local_logits, None
    if gating is None:
        raise ValueError("non-local experts given without a gating network")
    moe, attention = gating(image_features, expert_features)
    mixed = torch.einsum("bd,bcd->bc", gating.pool(image_features), moe)
    return lam * local_logits + logit_scale * mixed, attention

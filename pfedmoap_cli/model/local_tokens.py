"""Local image tokens: CLIP's last image layer at every spatial position, projected to D.

FedOTP (PROTOCOL.md section 6) transports each class prompt onto image regions,
so it needs more of the image encoder than the pooled feature: one D-dim
token per spatial position of the last layer. This module computes them from
the frozen open_clip towers by calling the towers' own submodules, and never
copies or changes the encoders:

* **ViT** (open_clip ``VisionTransformer``): the transformer's output at every
  token, after the final LayerNorm ``ln_post`` and the projection ``proj``.
  The class token is the pooled feature (``encode_image``); the patch tokens
  are the local ones.
* **RN50** (open_clip ``ModifiedResNet``): the attention pool evaluated at
  every spatial position. open_clip only returns the output of the mean token
  (its single query); here every position is a query too, with the pool's own
  q/k/v/c projections, over the same keys and values (mean token plus all
  positions, with the pool's positional embedding). Row 0 -- the mean-token
  query -- is exactly the pooled feature. This is how PLOT and FedOTP obtain
  RN50 local features (their attention pool returns all its outputs).

The result of :func:`encode_image_tokens` is ``(B, 1 + M, D)``: row 0 the
pooled (global) feature, rows 1..M the local tokens, every row L2-normalised
float32, computed without gradient under the backbone's autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.model.backbone import FrozenClip

__all__ = ["attention_pool_tokens", "encode_image_tokens", "num_local_tokens", "resnet_tokens", "vit_tokens"]


def _tower_kind(visual: torch.nn.Module) -> str:
    open_clip = import_open_clip()
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise ConfigError(
                "local image tokens need a ViT pooled by its class token (no attentional pool, LayerNorm before pooling); "
                "choose a CLIP ViT such as ViT-B-16 or a ResNet such as RN50"
            )
        return "vit"
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        return "resnet"
    raise ConfigError(
        f"local image tokens are available for open_clip ViT and ModifiedResNet image towers, not {type(visual).__name__}; "
        "choose a CLIP backbone such as RN50 or ViT-B-16"
    )


def vit_tokens(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens ``(B, 1 + M, D)`` of an open_clip ViT: class token first, unnormalised.

    The same operations as ``VisionTransformer.forward`` with token pooling,
    except that ``ln_post`` and ``proj`` are applied to every token instead of
    the class token only (both act per token, so row 0 is the pooled output).
    """
    x = visual._embeds(images)
    x = visual.transformer(x)
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return x


def attention_pool_tokens(pool: torch.nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """The attention pool of a ModifiedResNet at every position: ``(B, 1 + H*W, D)``.

    Parameters
    ----------
    pool:
        open_clip ``AttentionPool2d`` (its weights are used as they are).
    feature_map:
        ``(B, C, H, W)``, the output of the last residual stage.

    Returns
    -------
    Tensor
        Row 0 is the mean-token query, which is what ``pool(feature_map)``
        returns; row 1 + p is position p (row-major) used as the query. Keys and
        values are the mean token and all positions, as in the pool itself.
    """
    batch, channels, height, width = feature_map.shape
    tokens = feature_map.reshape(batch, channels, height * width).permute(0, 2, 1)  # (B, HW, C)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1+HW, C)
    tokens = tokens + pool.positional_embedding.to(tokens.dtype)
    heads = pool.num_heads
    head_dim = channels // heads
    length = tokens.shape[1]

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, head_dim)
        return x.reshape(batch, length, heads, head_dim).transpose(1, 2)

    query, key, value = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
    weights = torch.softmax((query * head_dim**-0.5) @ key.transpose(-2, -1), dim=-1)
    out = (weights @ value).transpose(1, 2).reshape(batch, length, channels)
    return pool.c_proj(out)


def resnet_tokens(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens ``(B, 1 + H*W, D)`` of an open_clip ModifiedResNet, pooled token first, unnormalised."""
    x = visual.stem(images)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    x = visual.layer4(x)
    return attention_pool_tokens(visual.attnpool, x)


@torch.no_grad()
def encode_image_tokens(clip: FrozenClip, images: torch.Tensor) -> torch.Tensor:
    """Global and local image tokens ``(B, 1 + M, D)``, each row L2-normalised, float32.

    Row 0 equals :meth:`FrozenClip.encode_images` (up to float rounding);
    rows 1..M are the local tokens (M = number of spatial positions of the
    last image layer: 49 for RN50 at 224 px, 196 for ViT-B/16).

    Raises
    ------
    ConfigError
        An image tower other than an open_clip ViT (class-token pooled) or ModifiedResNet.
    """
    visual = clip.clip.visual
    kind = _tower_kind(visual)
    images = images.to(clip.device, non_blocking=True)
    with clip.autocast():
        tokens = vit_tokens(visual, images) if kind == "vit" else resnet_tokens(visual, images)
    return F.normalize(tokens.float(), dim=-1)


def num_local_tokens(clip: FrozenClip) -> int:
    """M, the number of local tokens per image of this backbone (its last layer's positions)."""
    visual = clip.clip.visual
    if _tower_kind(visual) == "vit":
        grid = visual.grid_size
        return int(grid[0] * grid[1])
    return int(visual.attnpool.positional_embedding.shape[0] - 1)

"""FedTPG's text-driven prompt generator: class-name features in, a CoOp context out.

Qiu, Li, Mummadi, Ganesh, Li, Peng and Lin, "Federated Text-driven Prompt
Generation for Vision-Language Models" (ICLR 2024). For a label set with frozen, normalised CLIP text
features ``E`` (C_set, D) of its bare class names, the generator ``g`` maps

    A = MHA(query = LN_q(Q), key = value = LN_e(E))        (n_ctx, W), no residual
    Z = A + FF(A),  FF(A) = Linear_out(GEGLU(Linear_in(LN_f(A))))

where ``Q`` (n_ctx, W) are learnable queries drawn from N(0, 0.02^2), MHA is
multi-head attention with embedding width W and key/value width D, Linear_in
maps W -> 8W, GEGLU splits its input's last dimension into halves ``(x, gate)``
and returns ``x * GELU(gate)`` (4W), and Linear_out maps 4W -> W. ``Z`` is the
context shared by every class of the label set. The attention pools over the
rows of ``E`` without positions, so ``Z`` does not depend on their order.

Parameters (for n_ctx queries): n_ctx W (queries) + 2W + 2D + 2W (three layer
norms) + 2 W^2 + 2 W D + 4W (attention: q, k, v and output projections with
biases) + 8 W^2 + 8W (Linear_in) + 4 W^2 + W (Linear_out). At W = D = 512 and
n_ctx = 4 that is 4,206,080 (measured by constructing it).

The module is built deterministically from a ``torch.Generator`` (its own
initialisation, not the default layers' draws from the global RNG), and is
moved between a plain ``dict[str, Tensor]`` (a federated method's state) and a
module with :func:`generator_state` and :func:`generator_from_state`.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: Standard deviation of the learnable queries' initialisation (as CoOp's context).
QUERY_INIT_STD = 0.02
#: Key prefix of the generator's weights in a method state.
STATE_PREFIX = "generator."


class GEGLU(nn.Module):
    """``x * GELU(gate)`` where ``(x, gate)`` are the two halves of the last dimension."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, gate = inputs.chunk(2, dim=-1)
        return x * F.gelu(gate)


def _uniform(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class PromptGenerator(nn.Module):
    """The generator ``g``: (C_set, D) class-name features -> (n_ctx, W) context.

    Parameters
    ----------
    n_ctx:
        Number of context vectors (learnable queries).
    width:
        W, the width of the text encoder's token embeddings (the context's width).
    text_dim:
        D, the width of the CLIP text features the generator is conditioned on.
    num_heads:
        Attention heads; must divide ``width``.
    generator:
        Random source of the initialisation (None: the global RNG).
    device:
        Where the weights are created.
    """

    def __init__(
        self,
        n_ctx: int,
        width: int,
        text_dim: int,
        num_heads: int = 4,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if n_ctx < 1 or width < 1 or text_dim < 1:
            raise ValueError(f"n_ctx, width and text_dim must be positive, got {n_ctx}, {width}, {text_dim}")
        if num_heads < 1 or width % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a positive divisor of width={width}")
        self.n_ctx, self.width, self.text_dim, self.num_heads = int(n_ctx), int(width), int(text_dim), int(num_heads)
        # Built on the meta device (no draws from the global RNG), then given
        # storage and initialised from ``generator`` alone.
        meta = torch.device("meta")
        self.queries = nn.Parameter(torch.empty(n_ctx, width, device=meta))
        self.ln_query = nn.LayerNorm(width, device=meta)
        self.ln_text = nn.LayerNorm(text_dim, device=meta)
        self.attn = nn.MultiheadAttention(width, num_heads, kdim=text_dim, vdim=text_dim, batch_first=True, device=meta)
        self.ff_norm = nn.LayerNorm(width, device=meta)
        self.ff_in = nn.Linear(width, 8 * width, device=meta)
        self.geglu = GEGLU()
        self.ff_out = nn.Linear(4 * width, width, device=meta)
        self.to_empty(device=device if device is not None else "cpu")
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Queries ~ N(0, 0.02^2); PyTorch's default schemes for the layers, drawn from ``generator``.

        Layer norms: weight 1, bias 0. Attention: Xavier-uniform input
        projections, zero input and output biases, output weight and the
        feed-forward Linears U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and
        biases), as ``nn.MultiheadAttention`` and ``nn.Linear`` initialise.
        Draws run in a fixed order, on the generator's device.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")

        def fill(param: torch.Tensor, draw) -> None:
            values = torch.empty(param.shape, dtype=torch.float32, device=gen_device)
            draw(values)
            with torch.no_grad():
                param.copy_(values.to(param.device, param.dtype))

        fill(self.queries, lambda t: t.normal_(0.0, QUERY_INIT_STD, generator=generator))
        for norm in (self.ln_query, self.ln_text, self.ff_norm):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        attn = self.attn
        if attn._qkv_same_embed_dim:
            # Packed (3W, W): Xavier over the whole matrix, as nn.MultiheadAttention does.
            fan_out, fan_in = attn.in_proj_weight.shape
            fill(attn.in_proj_weight, lambda t: _uniform(t, math.sqrt(6.0 / (fan_in + fan_out)), generator))
        else:
            for weight in (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight):
                fan_out, fan_in = weight.shape
                fill(weight, lambda t, b=math.sqrt(6.0 / (fan_in + fan_out)): _uniform(t, b, generator))
        nn.init.zeros_(attn.in_proj_bias)
        fill(attn.out_proj.weight, lambda t: _uniform(t, 1.0 / math.sqrt(self.width), generator))
        nn.init.zeros_(attn.out_proj.bias)
        for linear in (self.ff_in, self.ff_out):
            bound = 1.0 / math.sqrt(linear.in_features)
            fill(linear.weight, lambda t, b=bound: _uniform(t, b, generator))
            fill(linear.bias, lambda t, b=bound: _uniform(t, b, generator))

    def forward(self, class_features: torch.Tensor) -> torch.Tensor:
        """The context Z (n_ctx, W) for the label set whose class-name features are ``class_features``.

        Parameters
        ----------
        class_features:
            E (C_set, D): frozen, normalised CLIP text features of the label
            set's bare class names. The label set is this argument, so the
            same generator serves any set (all classes, a client's, base or novel).
        """
        if class_features.dim() != 2 or class_features.shape[1] != self.text_dim:
            raise ValueError(f"class_features must be (C_set, {self.text_dim}); got {tuple(class_features.shape)}")
        keys = self.ln_text(class_features.to(self.queries.device, self.queries.dtype)).unsqueeze(0)
        query = self.ln_query(self.queries).unsqueeze(0)
        attended, _ = self.attn(query, keys, keys, need_weights=False)
        attended = attended[0]
        return attended + self.ff_out(self.geglu(self.ff_in(self.ff_norm(attended))))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return int(sum(p.numel() for p in module.parameters()))


def generator_state(module: PromptGenerator, prefix: str = STATE_PREFIX) -> dict[str, torch.Tensor]:
    """The module's weights as a plain state: ``prefix + name`` -> detached float32 copy."""
    return {prefix + name: tensor.detach().to(torch.float32).clone() for name, tensor in module.state_dict().items()}


def generator_from_state(
    state: Mapping[str, torch.Tensor],
    num_heads: int,
    prefix: str = STATE_PREFIX,
    device: torch.device | str | None = None,
) -> PromptGenerator:
    """A fresh module holding the weights under ``prefix`` in ``state`` (copies; trainable).

    n_ctx, W and D are read from the shapes of the queries and of the text
    layer norm; ``num_heads`` cannot be read from shapes and is given.
    Draws nothing from any random stream.
    """
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    n_ctx, width = weights["queries"].shape
    text_dim = weights["ln_text.weight"].shape[0]
    # A throwaway CPU generator feeds the initialisation (no global draws), which
    # load_state_dict then overwrites entirely (strict: every weight present).
    module = PromptGenerator(n_ctx, width, text_dim, num_heads, generator=torch.Generator().manual_seed(0), device=device)
    module.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    return module

"""CoOp prompts and the text encoder that turns a learned context into class features.

The prompt of class c is the token sequence of ``"X X ... X <name>."``; the
embeddings of the n_ctx placeholder tokens are replaced by the learnable
context ``ctx`` (PROTOCOL.md section 1). Only ``ctx`` is trainable: it is an
argument of :meth:`PromptTextEncoder.forward`, not a parameter of the module,
so methods own their prompts (one per client, per expert, the global one) and
a single encoder serves them all, batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.model.backbone import FrozenClip

PLACEHOLDER = "X"
INIT_STD = 0.02
#: Text sequences (prompts x classes) per encoder call in :meth:`PromptTextEncoder.encode_many`:
#: 100 clients' prompts over CIFAR-100's classes are 10,000 sequences, too many for one call.
MAX_SEQUENCES_PER_CALL = 4096


def _class_text(name: str) -> str:
    return name.replace("_", " ").strip()


def _project(clip: FrozenClip, pooled: torch.Tensor) -> torch.Tensor:
    projection = clip.clip.text_projection
    if projection is None:
        return pooled
    if isinstance(projection, torch.nn.Linear):
        return projection(pooled)
    return pooled @ projection


class PromptTextEncoder(torch.nn.Module):
    """Text features of all classes for one or many learned contexts.

    Parameters
    ----------
    clip:
        The frozen backbone. It is referenced, not registered as a submodule, so
        this module's ``state_dict`` and ``parameters`` hold none of CLIP's weights.
    class_names:
        Names in label order (underscores become spaces).
    n_ctx:
        Number of context vectors; ignored when ``init_phrase`` is given.
    init_phrase:
        Optional phrase (e.g. ``"a photo of a"``) whose tokens take the context
        positions; n_ctx becomes its token count and :meth:`initial_context`
        returns its token embeddings.
    truncate:
        Run the transformer only up to the last EOT position. Exact, because the
        mask is causal and only the EOT output is read; ``False`` runs the full
        context (the reference path).

    Raises
    ------
    ConfigError
        A prompt longer than the text context, or an invalid ``n_ctx``.
    """

    def __init__(
        self,
        clip: FrozenClip,
        class_names: list[str],
        n_ctx: int = 16,
        init_phrase: str | None = None,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ConfigError("no class names given to the prompt learner; check the dataset's class list")
        object.__setattr__(self, "clip", clip)  # plain attribute: keep CLIP out of this module's state
        self.truncate = bool(truncate)
        phrase = " ".join(init_phrase.replace("_", " ").split()) if init_phrase else None
        if phrase:
            n_ctx = self._phrase_length(phrase)
            prefix = phrase
        else:
            if int(n_ctx) < 1:
                raise ConfigError(f"--n-ctx must be at least 1 (got {n_ctx})")
            prefix = " ".join([PLACEHOLDER] * int(n_ctx))
        self.n_ctx = int(n_ctx)
        self.init_phrase = phrase
        self.class_names = [_class_text(name) for name in class_names]
        self.num_classes = len(self.class_names)
        self.width = clip.text_width
        texts = [f"{prefix} {name}." for name in self.class_names]
        self._check_lengths(texts)

        tokens = clip.tokenize(texts)
        eot = clip.eot_positions(tokens)
        if self.truncate and clip.clip.attn_mask is None:
            raise ConfigError(f"model {clip.spec.model} has no causal text mask, so EOT truncation is inexact; disable truncation")
        device = clip.device
        with torch.no_grad():
            embedding = clip.clip.token_embedding(tokens.to(device))
        self.register_buffer("token_ids", tokens.to(device), persistent=False)
        self.register_buffer("eot", eot.to(device), persistent=False)
        self.register_buffer("embedding", embedding, persistent=False)
        # Positions 0..max_eot are all the transformer ever needs to see.
        self.used_length = int(eot.max()) + 1
        self.texts = texts

    # -- construction helpers -----------------------------------------------------------
    def _phrase_length(self, phrase: str) -> int:
        count = self.clip.token_count(phrase)
        if count is None:  # tokenizer without .encode: EOT sits right after the phrase
            count = int(self.clip.eot_positions(self.clip.tokenize([phrase]))[0]) - 1
        if count < 1:
            raise ConfigError(f"--ctx-init {phrase!r} has no tokens; give a phrase such as 'a photo of a'")
        return count

    def _check_lengths(self, texts: list[str]) -> None:
        limit = self.clip.context_length
        counts = [self.clip.token_count(text) for text in texts]
        if all(count is not None for count in counts):
            too_long = [(count + 2, name) for count, name in zip(counts, self.class_names) if count + 2 > limit]
        else:  # no way to count: a full last position may mean the tokenizer cut the prompt
            full = self.clip.tokenize(texts)[:, -1] != 0
            too_long = [(limit + 1, name) for name, cut in zip(self.class_names, full.tolist()) if cut]
        if too_long:
            length, name = max(too_long)
            raise ConfigError(
                f"prompt for class {name!r} needs {length} tokens but the text context holds {limit}; "
                "use a smaller --n-ctx (or a shorter --ctx-init) or shorter class names"
            )

    # -- public API ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def initial_context(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh context (n_ctx, W) in float32 on the backbone's device.

        N(0, 0.02) drawn with ``generator`` (on the generator's device), or the
        phrase's token embeddings when ``init_phrase`` is set.
        """
        if self.init_phrase:
            return self.embedding[0, 1 : 1 + self.n_ctx].detach().float().clone()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        ctx = torch.empty(self.n_ctx, self.width, dtype=torch.float32, device=gen_device)
        ctx.normal_(0.0, INIT_STD, generator=generator)
        return ctx.to(self.device)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class text features for the context(s) ``ctx``.

        Parameters
        ----------
        ctx:
            (n_ctx, W) for one prompt or (P, n_ctx, W) for P prompts at once.

        Returns
        -------
        Tensor
            float32 (C, D), or (P, C, D) for batched contexts; differentiable
            with respect to ``ctx``.
        """
        single = ctx.dim() == 2
        if single:
            ctx = ctx.unsqueeze(0)
        if ctx.dim() != 3 or tuple(ctx.shape[1:]) != (self.n_ctx, self.width):
            raise ValueError(f"ctx must be ({self.n_ctx}, {self.width}) or (P, {self.n_ctx}, {self.width}); got {tuple(ctx.shape)}")
        clip = self.clip.clip
        num_prompts, num_classes, length = ctx.shape[0], self.num_classes, self.clip.context_length
        if self.truncate:
            length = self.used_length
        embedding = self.embedding[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        prefix = embedding[:, :1].unsqueeze(0).expand(num_prompts, -1, -1, -1)
        suffix = embedding[:, 1 + self.n_ctx :].unsqueeze(0).expand(num_prompts, -1, -1, -1)
        middle = ctx.to(device=embedding.device, dtype=embedding.dtype).unsqueeze(1).expand(-1, num_classes, -1, -1)
        x = torch.cat([prefix, middle, suffix], dim=2).reshape(num_prompts * num_classes, length, self.width)
        x = x.to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        eot = self.eot.repeat(num_prompts)
        with self.clip.autocast():
            x = clip.transformer(x, attn_mask=mask)
            # ln_final acts per position, so reading the EOT row first is the same maths, cheaper.
            pooled = clip.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
            features = _project(self.clip, pooled)
        features = F.normalize(features.float(), dim=-1).reshape(num_prompts, num_classes, -1)
        return features[0] if single else features

    @torch.no_grad()
    def encode_many(self, ctx: torch.Tensor, max_sequences: int | None = None) -> torch.Tensor:
        """Features (P, C, D) of P contexts (P, n_ctx, W), without gradient, in bounded calls.

        Each encoder call holds at most ``max_sequences`` text sequences
        (prompts x classes; default :data:`MAX_SEQUENCES_PER_CALL`), and at
        least one prompt, so memory stays bounded however many prompts
        (experts, clients) a round needs.
        """
        if max_sequences is None:
            max_sequences = MAX_SEQUENCES_PER_CALL
        if ctx.dim() != 3:
            raise ValueError(f"encode_many takes (P, {self.n_ctx}, {self.width}) contexts; got {tuple(ctx.shape)}")
        per_call = max(1, int(max_sequences) // self.num_classes)
        if ctx.shape[0] == 0:
            return torch.empty(0, self.num_classes, self.clip.embed_dim, device=self.device)
        return torch.cat([self(ctx[start : start + per_call]) for start in range(0, ctx.shape[0], per_call)])


@torch.no_grad()
def encode_texts(clip: FrozenClip, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised float32 features (len(texts), D) of fixed prompts, e.g. ``"a photo of a {name}."``."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenize(texts[start : start + batch_size]).to(clip.device)
        with clip.autocast():
            features = clip.clip.encode_text(tokens)
        chunks.append(F.normalize(features.float(), dim=-1))
    if not chunks:
        return torch.empty(0, clip.embed_dim)
    return torch.cat(chunks)

"""The frozen CLIP backbone: naming it, loading it, and running its encoders.

A backbone is an open_clip model name plus a weight source: a pretrained tag
(``"openai"``), a local checkpoint file, or nothing (random weights from a
fixed seed, which is what the tests and offline demos use).

RN50 needs QuickGELU to match OpenAI's weights: pass ``RN50-quickgelu`` or the
``openai`` tag (for tags whose weights were trained with QuickGELU, this module
switches it on, as open_clip only warns about the mismatch).
"""

from __future__ import annotations

import logging

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
import torch.nn.functional as F

from pfedmoap_cli.artifacts.atomic import sha256_file
from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ArtifactError, ConfigError, UserError
from pfedmoap_cli.model import pretrained as project_weights
from pfedmoap_cli.model import transforms
from pfedmoap_cli.model.checkpoints import (
    build_openai_model,
    check_clip_layout,
    load_open_clip_state,
    looks_like_path,
    read_checkpoint,
)
from pfedmoap_cli.model.device import autocast_context, precision_tag, resolve_device
from pfedmoap_cli.model.hub import resolve_tag_weights

__all__ = ["BackboneSpec", "FrozenClip", "load_backbone", "resolve_device", "register_tiny_configs"]

_CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTERED = False
_CLIP_TEXT_ATTRS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
_LIST_MODELS_HINT = "see the names with: python -c \"import open_clip; print(open_clip.list_models())\" (plus tiny-vit, tiny-rn, micro-clip)"


def register_tiny_configs() -> None:
    """Make the package's architectures (``tiny-vit``, ``tiny-rn``) known to open_clip, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    import_open_clip().add_model_config(_CONFIG_DIR)
    _REGISTERED = True


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime so a replaced file is re-hashed, an unchanged one is not.
    return sha256_file(Path(path))


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP to use.

    Attributes
    ----------
    model:
        open_clip model name (``"RN50-quickgelu"``, ``"ViT-B-16"``, ``"tiny-vit"``,
        ``"tiny-rn"``, ...). For an OpenAI-format checkpoint file it is only a label.
    pretrained:
        open_clip pretrained tag (``"openai"``), a tag the project ships (``model/pretrained.py``), a path to a local checkpoint
        file, or ``None`` for random weights.
    init_seed:
        Torch seed of the random weights when ``pretrained`` is ``None``.
    """

    model: str
    pretrained: str | None
    init_seed: int = 0

    def local_file(self) -> Path | None:
        """The checkpoint path when ``pretrained`` names an existing file, else ``None``."""
        if self.pretrained and os.path.isfile(os.path.expanduser(self.pretrained)):
            return Path(os.path.expanduser(self.pretrained)).resolve()
        return None

    def identity(self) -> str:
        """Stable string naming these exact weights (for cache keys and metadata)."""
        if self.pretrained is None:
            return f"{self.model}|random:{self.init_seed}"
        path = self.local_file()
        if path is not None:
            stat = path.stat()
            return f"{self.model}|sha256:{_file_digest(str(path), stat.st_size, stat.st_mtime_ns)}"
        shipped = project_weights.get_pretrained(self.model, self.pretrained)
        return project_weights.weights_identity(shipped) if shipped else f"{self.model}|{self.pretrained}"


class FrozenClip(torch.nn.Module):
    """An open_clip ``CLIP`` with every weight frozen, plus what the methods need of it.

    Attributes
    ----------
    clip:
        The open_clip model; always in eval mode, no parameter requires grad.
    spec:
        The :class:`BackboneSpec` it was loaded from.
    embed_dim:
        D, the joint embedding width.
    text_width:
        Width of the text transformer (the prompt context vectors' width).
    image_size:
        Input resolution of the image tower.
    logit_scale:
        ``exp(clip.logit_scale)`` as a Python float (about 100 for OpenAI weights).
    context_length:
        Token positions of the text tower (77).
    amp:
        Whether the frozen encoders run under bf16 autocast on CUDA.
    mean, std:
        Normalisation of the model's preprocess config.
    """

    def __init__(self, clip: torch.nn.Module, spec: BackboneSpec, tokenizer, amp: bool = True) -> None:
        super().__init__()
        missing = [name for name in _CLIP_TEXT_ATTRS if not hasattr(clip, name)]
        if missing:
            raise ConfigError(
                f"model {spec.model} is a {type(clip).__name__}, not an open_clip CLIP with a built-in text tower "
                f"(missing {', '.join(missing)}); choose a CLIP architecture such as RN50-quickgelu or ViT-B-16"
            )
        if getattr(clip, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ConfigError(
                f"model {spec.model} pools text by {clip.text_pool_type!r}; only EOT-pooled CLIP text towers are supported"
            )
        clip.eval()
        clip.requires_grad_(False)
        self.clip = clip
        self.spec = spec
        self.amp = bool(amp)
        self._tokenizer = tokenizer
        projection = clip.text_projection
        if projection is None:
            self.embed_dim = int(clip.transformer.width)
        elif isinstance(projection, torch.nn.Linear):
            self.embed_dim = int(projection.out_features)
        else:
            self.embed_dim = int(projection.shape[1])
        self.text_width = int(clip.transformer.width)
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(clip.context_length)
        self.logit_scale = float(clip.logit_scale.detach().float().exp().reshape(-1)[0])
        open_clip = import_open_clip()
        cfg = open_clip.model.get_model_preprocess_cfg(clip)
        self.mean = tuple(float(v) for v in (cfg.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in (cfg.get("std") or open_clip.constants.OPENAI_DATASET_STD))

    # -- state --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device the weights live on."""
        return self.clip.positional_embedding.device

    def train(self, mode: bool = True) -> "FrozenClip":
        # The backbone is frozen: batch-norm statistics (ResNet towers) must never update,
        # even when a parent module is switched to training mode.
        super().train(mode)
        self.clip.eval()
        return self

    def autocast(self) -> ContextManager:
        """Context the frozen encoders run under: bf16 autocast on CUDA with ``amp``, else a no-op."""
        return autocast_context(self.device, self.amp)

    def precision(self) -> str:
        """Name of the encoders' arithmetic (``bf16-autocast`` or ``fp32-<device>``)."""
        return precision_tag(self.device, self.amp)

    # -- text ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        """Token ids (len(texts), context_length) from this model's tokenizer (on CPU)."""
        return self._tokenizer(list(texts)).long()

    def token_count(self, text: str) -> int | None:
        """Number of BPE tokens of ``text`` without start/end tokens, or ``None`` if unknown."""
        encode = getattr(self._tokenizer, "encode", None)
        return len(encode(text)) if callable(encode) else None

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the token whose output is the text feature, per row."""
        if getattr(self.clip, "text_pool_type", "argmax") == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    # -- images -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (B, D) in float32."""
        images = images.to(self.device, non_blocking=True)
        with self.autocast():
            features = self.clip.encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def train_transform(self):
        """Training augmentation for RGB PIL images (PROTOCOL.md section 1)."""
        return transforms.train_transform(self.image_size, self.mean, self.std)

    def test_transform(self):
        """Deterministic evaluation preprocessing for RGB PIL images."""
        return transforms.test_transform(self.image_size, self.mean, self.std)

    def test_transform_id(self) -> str:
        """Stable description of :meth:`test_transform` for cache keys."""
        return transforms.test_transform_id(self.image_size, self.mean, self.std)


def _check_model_name(open_clip, name: str) -> None:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown model {name!r}; {_LIST_MODELS_HINT}")
    text_cfg = cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text_cfg or "multimodal_cfg" in cfg:
        raise ConfigError(
            f"model {name} has a custom text tower, which prompt learning here does not support; "
            "choose a CLIP architecture such as RN50-quickgelu or ViT-B-16"
        )


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a warning for every model built without weights; here that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_seeded(open_clip, name: str, seed: int, **kwargs) -> torch.nn.Module:
    # fork_rng keeps the caller's RNG stream untouched by weight initialisation.
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(name, **kwargs)
    finally:
        root.removeFilter(notice)


def _create_from_tag(open_clip, spec: BackboneSpec) -> torch.nn.Module:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(spec.model, spec.pretrained)
    if not tag_cfg:
        shipped = [tag for model, tag in project_weights.list_pretrained() if model == spec.model]
        tags = ", ".join([*shipped, *list_pretrained_tags_by_model(spec.model)]) or "none"
        raise ConfigError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.model} (known: {tags}); "
            "pass one of those, a local checkpoint path, or no --pretrained for random weights"
        )
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not open_clip.get_model_config(spec.model).get("quick_gelu")
    # The file is found here (local cache first, offline-safe, no retry loop: model/hub.py), then open_clip
    # builds the architecture and loads it as it would for the tag, with the tag's preprocessing.
    path = resolve_tag_weights(open_clip, spec.model, spec.pretrained, tag_cfg)
    preprocess = {key: value for key, value in tag_cfg.items() if key != "size"}
    try:
        return _create_seeded(
            open_clip, spec.model, spec.init_seed, pretrained=path, force_quick_gelu=quick_gelu,
            force_preprocess_cfg=preprocess,
        )
    except Exception as error:
        cause = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ArtifactError(
            f"pretrained weights {spec.model}/{spec.pretrained} at {path} do not load ({type(error).__name__}: {cause}); "
            "delete that file from the cache to download it again, or pass a local checkpoint with --pretrained PATH"
        ) from error


def _tokenizer_for(open_clip, name: str, context_length: int):
    if open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name, context_length=context_length)
    # An OpenAI checkpoint labelled with a free-form name: OpenAI CLIP's BPE tokenizer.
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu", amp: bool = True) -> FrozenClip:
    """Build the frozen CLIP named by ``spec`` on ``device``.

    Parameters
    ----------
    spec:
        Model name and weight source.
    device:
        A torch device or a ``--device`` value (``"auto"``, ``"cpu"``, ``"cuda"``).
    amp:
        Run the frozen encoders under bf16 autocast when on CUDA.

    Raises
    ------
    ConfigError
        Unknown model name or tag, or an architecture without a CLIP text tower.
    ArtifactError
        A checkpoint path that does not exist or does not load.
    UserError
        Pretrained weights that cannot be downloaded (offline).
    """
    open_clip = import_open_clip()
    register_tiny_configs()
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    path = spec.local_file()
    if path is None and spec.pretrained and looks_like_path(spec.pretrained):
        raise ArtifactError(f"checkpoint file {spec.pretrained} does not exist; check the path given to --pretrained")
    if path is not None:
        contents = read_checkpoint(path)
        if contents.openai_format or (contents.layout and open_clip.get_model_config(spec.model) is None):
            # Self-describing OpenAI files, and OpenAI-layout state dicts under a name open_clip does not
            # know (a label): the architecture comes from the tensor shapes, with OpenAI's QuickGELU.
            clip = build_openai_model(contents.state_dict, path)
        else:
            _check_model_name(open_clip, spec.model)
            if contents.layout:
                check_clip_layout(spec.model, contents.state_dict, contents.layout, path)
            clip = _create_seeded(open_clip, spec.model, spec.init_seed, pretrained=None)
            load_open_clip_state(clip, contents.state_dict, spec.model, path)
    elif spec.pretrained is None:
        _check_model_name(open_clip, spec.model)
        clip = _create_seeded(open_clip, spec.model, spec.init_seed, pretrained=None)
    elif (shipped := project_weights.get_pretrained(spec.model, spec.pretrained)) is not None:
        clip = project_weights.create_pretrained_model(shipped)
    else:
        _check_model_name(open_clip, spec.model)
        clip = _create_from_tag(open_clip, spec)
    tokenizer = _tokenizer_for(open_clip, spec.model, int(clip.context_length))
    frozen = FrozenClip(clip, spec, tokenizer, amp=amp)
    return frozen.to(device)

"""Reading CLIP weights from a local checkpoint file.

Three formats are accepted:

* an open_clip state dict (``torch.save(model.state_dict())``), optionally
  wrapped under ``"state_dict"`` and/or with DataParallel ``module.``
  prefixes, as written by open_clip's training program;
* the same state dict as a ``.safetensors`` file;
* an OpenAI-format CLIP: a TorchScript archive as OpenAI distributes it, or a
  plain state dict carrying the integer entries ``input_resolution``,
  ``context_length`` and ``vocab_size``. Its architecture is inferred from the
  tensor shapes (``open_clip.model.build_model_from_openai_state_dict``), so
  the model name is only a label; OpenAI models use QuickGELU.

A plain state dict in the OpenAI CLIP layout *without* those three entries
(``torch.save(model.state_dict())`` from OpenAI's ``clip`` package; open_clip's
own CLIP state dicts have the same keys) is recognised from its keys
(:func:`clip_layout`): with a ``--backbone`` that open_clip knows, it is
loaded into that architecture (whose name decides GELU or QuickGELU, e.g.
``ViT-B-16`` or ``ViT-B-16-quickgelu``), and a mismatch names the known
architectures whose parameter shapes match the file; with any other name
(a label), the architecture is built from the shapes with QuickGELU, as for
OpenAI's own files.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ArtifactError

OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class CheckpointContents:
    """Tensors read from a checkpoint file and the format they are in."""

    state_dict: dict
    openai_format: bool
    layout: str | None = None
    """``"vit"`` or ``"resnet"`` when the tensors are a CLIP in OpenAI's key layout (see :func:`clip_layout`)."""


def looks_like_path(value: str) -> bool:
    """True when a ``--pretrained`` value is meant as a file rather than a tag."""
    return "/" in value or "\\" in value or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _is_torchscript_archive(path: Path) -> bool:
    # TorchScript archives are zip files holding a constants.pkl next to the code;
    # torch.save archives never contain one.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _unwrap(checkpoint: object, path: Path) -> dict:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ArtifactError(f"{path} holds no state dict; pass a file written with torch.save(model.state_dict())")
    if all(isinstance(key, str) and key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    return checkpoint


def read_checkpoint(path: Path) -> CheckpointContents:
    """Read the weights in ``path`` (see the module docstring for the formats).

    Raises
    ------
    ArtifactError
        The file cannot be read as any of the accepted formats.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return CheckpointContents(_unwrap(load_file(str(path), device="cpu"), path), openai_format=False)
        if _is_torchscript_archive(path):
            state_dict = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            return CheckpointContents(state_dict, openai_format=True)
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except ArtifactError:
        raise
    except Exception as error:  # corrupt file, foreign pickle, truncated download...
        raise ArtifactError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "pass an open_clip or OpenAI CLIP state dict (.pt/.bin/.safetensors)"
        ) from error
    state_dict = _unwrap(checkpoint, path)
    openai = all(key in state_dict for key in OPENAI_INT_KEYS)
    return CheckpointContents(state_dict, openai_format=openai, layout=clip_layout(state_dict))


_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "ln_final.weight")
_VIT_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj")
_RESNET_KEYS = ("visual.conv1.weight", "visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")


def clip_layout(state_dict: dict) -> str | None:
    """``"vit"`` / ``"resnet"`` when ``state_dict`` is a CLIP in OpenAI's layout, else ``None``.

    The layout is read from the keys alone: the text tower (``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``,
    ``text_projection``, ``logit_scale``) plus either a vision transformer
    (``visual.conv1``, ``visual.class_embedding``, ``visual.transformer.resblocks.N``,
    ``visual.proj``) or a ModifiedResNet (``visual.layer1..4``, ``visual.attnpool``).
    """
    keys = [key for key in state_dict if isinstance(key, str)]
    if not all(key in state_dict for key in _TEXT_KEYS) or not any(k.startswith("transformer.resblocks.") for k in keys):
        return None
    if all(key in state_dict for key in _VIT_KEYS) and any(k.startswith("visual.transformer.resblocks.") for k in keys):
        return "vit"
    if all(key in state_dict for key in _RESNET_KEYS):
        return "resnet"
    return None


def _shape(state_dict: dict, key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def describe_layout(state_dict: dict, layout: str) -> str:
    """A short description of the architecture the shapes of an OpenAI-layout state dict tell."""
    text_layers = len({key.split(".")[2] for key in state_dict if key.startswith("transformer.resblocks.")})
    text = f"text width {_shape(state_dict, 'ln_final.weight')[0]}, {text_layers} layers"
    embed = _shape(state_dict, "text_projection")[1]
    if layout == "vit":
        width, _, patch, _ = _shape(state_dict, "visual.conv1.weight")
        layers = len({key.split(".")[3] for key in state_dict if key.startswith("visual.transformer.resblocks.")})
        grid = round((_shape(state_dict, "visual.positional_embedding")[0] - 1) ** 0.5)
        vision = f"ViT width {width}, {layers} layers, patch {patch}, {grid * patch} px"
    else:
        counts = tuple(
            len({key.split(".")[2] for key in state_dict if key.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
        )
        grid = round((_shape(state_dict, "visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        vision = f"ModifiedResNet layers {counts}, width {_shape(state_dict, 'visual.layer1.0.conv1.weight')[0]}, {grid * 32} px"
    return f"{vision}; {text}; embed {embed}"


def _config_could_match(cfg: dict, state_dict: dict, layout: str) -> bool:
    """Cheap pre-filter on a model config before building it (on the meta device) to compare every shape."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text or "multimodal_cfg" in cfg or "timm_model_name" in vision:
        return False
    if cfg.get("embed_dim") != _shape(state_dict, "text_projection")[1]:
        return False
    if text.get("width", 512) != _shape(state_dict, "ln_final.weight")[0]:
        return False
    if text.get("context_length", 77) != _shape(state_dict, "positional_embedding")[0]:
        return False
    if text.get("vocab_size", 49408) != _shape(state_dict, "token_embedding.weight")[0]:
        return False
    is_vit = isinstance(vision.get("layers", 12), int)
    if (layout == "vit") != is_vit:
        return False
    if layout == "vit":
        return vision.get("width", 768) == _shape(state_dict, "visual.conv1.weight")[0] and vision.get(
            "patch_size", 16
        ) == _shape(state_dict, "visual.conv1.weight")[-1]
    return vision.get("width", 64) == _shape(state_dict, "visual.layer1.0.conv1.weight")[0]


def matching_architectures(state_dict: dict, layout: str, limit: int = 6) -> list[str]:
    """open_clip model names whose parameters have exactly the keys and shapes of ``state_dict``."""
    open_clip = import_open_clip()
    wanted = _shapes(state_dict)
    matches = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if not cfg or not _config_could_match(cfg, state_dict, layout):
            continue
        try:
            with torch.device("meta"):  # no memory, no initialisation cost
                candidate = open_clip.model.CLIP(**cfg)
        except Exception:
            continue
        if _shapes(candidate.state_dict()) == wanted:
            matches.append(name)
            if len(matches) >= limit:
                break
    return matches


def build_openai_model(state_dict: dict, path: Path) -> torch.nn.Module:
    """Build an open_clip ``CLIP`` from an OpenAI-format state dict, in fp32.

    open_clip's builder converts the model to fp16 before loading; loading the
    tensors a second time after ``.float()`` keeps fp32 checkpoints exact.
    """
    open_clip = import_open_clip()
    # TorchScript archives also list non-persistent buffers; the causal mask is rebuilt anyway.
    state_dict = {key: value for key, value in state_dict.items() if key.split(".")[-1] != "attn_mask"}
    tensors = {key: value for key, value in state_dict.items() if key not in OPENAI_INT_KEYS}
    try:
        model = open_clip.model.build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True, cast_dtype=None)
        model.float()
        model.load_state_dict(tensors, strict=True)
    except Exception as error:
        raise ArtifactError(
            f"{path} looks like an OpenAI CLIP checkpoint but does not load "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}); pass an intact OpenAI or open_clip checkpoint"
        ) from error
    return model


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items() if hasattr(value, "shape")}


def check_clip_layout(model_name: str, state_dict: dict, layout: str, path: Path) -> None:
    """Before building ``model_name`` for real: do its parameter shapes equal the file's? Else one line naming the match.

    Raises
    ------
    ArtifactError
        The shapes differ; the message names ``--backbone``, the architecture the
        file's shapes tell, and the open_clip names that match them.
    """
    open_clip = import_open_clip()
    cfg = open_clip.get_model_config(model_name)
    try:
        with torch.device("meta"):
            expected = _shapes(open_clip.model.CLIP(**cfg).state_dict())
    except Exception:
        return  # not buildable here: the strict load reports any mismatch
    if expected == _shapes(state_dict):
        return
    matches = matching_architectures(state_dict, layout)
    if matches:
        hint = f"pass --backbone {matches[0]}" + (f" (also matching: {', '.join(matches[1:])})" if matches[1:] else "")
        if any(name.endswith("-quickgelu") for name in matches):
            hint += "; the -quickgelu names for OpenAI's weights"
    else:
        hint = "no architecture open_clip knows has these shapes"
    raise ArtifactError(
        f"checkpoint {path} is a CLIP state dict ({describe_layout(state_dict, layout)}) that does not match "
        f"--backbone {model_name}; {hint}; or pass a --backbone name open_clip does not know (a label, e.g. openai-clip) "
        "to build the architecture from the file's shapes with QuickGELU, as OpenAI's CLIP"
    )


def load_open_clip_state(model: torch.nn.Module, state_dict: dict, model_name: str, path: Path) -> None:
    """Load an open_clip state dict into ``model`` strictly, or explain the mismatch."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:200]
        raise ArtifactError(
            f"checkpoint {path} does not match architecture {model_name} ({detail}); "
            "pass the --backbone it was saved from"
        ) from error

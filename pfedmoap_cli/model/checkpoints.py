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
    return CheckpointContents(state_dict, openai_format=openai)


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

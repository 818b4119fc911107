"""The project's own pretrained weights: a (model, tag) table with checksums.

open_clip keeps a table of (architecture, pretrained tag) -> downloadable
weights with their checksums; this is the same idea for weights that ship
inside the package and therefore load offline. Today it holds one entry: the
micro-CLIP (``micro-clip`` / ``synthetic``), pretrained by
``scripts/pretrain_microclip.py`` on the synthetic world so that the whole
pipeline shows real learning without any download.

A weights file is verified against the sha256 recorded here before it is
used; a missing or altered file is an :class:`~pfedmoap_cli.errors.ArtifactError`
that names the fix.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedmoap_cli.artifacts.atomic import sha256_file
from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ArtifactError

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class PretrainedWeights:
    """One shipped set of weights.

    Attributes
    ----------
    model, tag:
        The open_clip architecture name and the pretrained tag it is known by.
    filename:
        Safetensors file under ``weights_dir`` (an open_clip state dict).
    sha256:
        Hex digest the file must have.
    command:
        The command that regenerates the file (run from the repository root).
    description:
        One line for listings.
    """

    model: str
    tag: str
    filename: str
    sha256: str
    command: str
    description: str


_REGISTRY: dict[tuple[str, str], PretrainedWeights] = {}


def register_pretrained(entry: PretrainedWeights) -> PretrainedWeights:
    """Add ``entry`` to the table (a programming error if the (model, tag) is taken by another)."""
    key = (entry.model, entry.tag)
    if key in _REGISTRY and _REGISTRY[key] != entry:
        raise ValueError(f"pretrained weights {entry.model}/{entry.tag} are already registered")
    _REGISTRY[key] = entry
    return entry


register_pretrained(
    PretrainedWeights(
        model="micro-clip",
        tag="synthetic",
        filename="micro-clip-synthetic.safetensors",
        sha256="1f94bd26fd314a28642378a6e0683c1261049d14b6db7230f493ca23c1cbe300",
        command="OMP_NUM_THREADS=1 python scripts/pretrain_microclip.py --out pfedmoap_cli/model/weights",
        description="micro-CLIP pretrained contrastively on the synthetic world (fp16 storage, loaded as fp32)",
    )
)


def get_pretrained(model: str, tag: str | None) -> PretrainedWeights | None:
    """The shipped weights named (``model``, ``tag``), or ``None`` when the project ships none."""
    if not tag:
        return None
    return _REGISTRY.get((model, tag))


def list_pretrained() -> list[tuple[str, str]]:
    """All (model, tag) pairs the project ships, sorted."""
    return sorted(_REGISTRY)


def weights_dir() -> Path:
    """Folder of the shipped weight files (a function so tests can point it elsewhere)."""
    return WEIGHTS_DIR


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime: an unchanged file is hashed once per process.
    return sha256_file(Path(path))


def weights_path(entry: PretrainedWeights) -> Path:
    """Path of ``entry``'s file after checking it exists and has the recorded sha256.

    Raises
    ------
    ArtifactError
        The file is missing or its sha256 differs; the message names the fix.
    """
    path = weights_dir() / entry.filename
    fix = f"reinstall pfedmoap (the package data includes it) or regenerate it with: {entry.command}"
    if not path.is_file():
        raise ArtifactError(f"the weights of {entry.model}/{entry.tag} ({path}) are missing; {fix}")
    stat = path.stat()
    digest = _digest(str(path), stat.st_size, stat.st_mtime_ns)
    if digest != entry.sha256:
        raise ArtifactError(
            f"the weights file {path} of {entry.model}/{entry.tag} has sha256 {digest[:16]}..., expected "
            f"{entry.sha256[:16]}... (corrupt or regenerated); {fix}, then put its sha256 into pfedmoap_cli/model/pretrained.py"
        )
    return path


def load_pretrained_state(entry: PretrainedWeights) -> dict[str, torch.Tensor]:
    """The verified state dict of ``entry``, in float32 (the file may store float16).

    Raises
    ------
    ArtifactError
        Missing or altered file, or one that safetensors cannot read.
    """
    from safetensors.torch import load_file

    path = weights_path(entry)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # a file with the right hash always loads; be explicit anyway
        raise ArtifactError(f"cannot read {path} ({type(error).__name__}); regenerate it with: {entry.command}") from error
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


def weights_identity(entry: PretrainedWeights) -> str:
    """Stable string naming these exact weights (for feature-cache keys)."""
    return f"{entry.model}|{entry.tag}|sha256:{entry.sha256}"


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning: the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def create_pretrained_model(entry: PretrainedWeights) -> torch.nn.Module:
    """Build ``entry``'s open_clip architecture and load its verified weights (float32, train mode as built).

    Raises
    ------
    ArtifactError
        Missing or altered file, or weights that do not fit the architecture's config.
    """
    open_clip = import_open_clip()
    state = load_pretrained_state(entry)  # verify before building anything
    if open_clip.get_model_config(entry.model) is None:
        open_clip.add_model_config(CONFIG_DIR)
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(0)
            model = open_clip.create_model(entry.model, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ArtifactError(
            f"the weights of {entry.model}/{entry.tag} do not fit configs/{entry.model}.json "
            f"({str(error).splitlines()[0][:160]}); restore the config or regenerate the weights with: {entry.command}"
        ) from error
    return model

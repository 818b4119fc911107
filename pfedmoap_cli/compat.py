"""Import open_clip and torchvision robustly.

On a CPU-only torch, a CUDA build of torchvision fails at import with
``operator torchvision::nms does not exist`` (and so does open_clip, which
imports it). Defining the schemas of the two missing operators lets the pure
Python parts (transforms, datasets, open_clip's preprocessing) import; only
the compiled ops stay unavailable, and this project does not use them. The
workaround is applied only when the plain import fails, so a working
torchvision is used untouched.
"""

from __future__ import annotations

import sys
from types import ModuleType

_PATCH_LIBRARY = None  # kept alive: the schemas vanish when the Library is collected


def _drop_partial_imports() -> None:
    for name in list(sys.modules):
        if name == "torchvision" or name.startswith("torchvision.") or name == "open_clip" or name.startswith("open_clip."):
            del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, patching missing operator schemas if needed."""
    global _PATCH_LIBRARY
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    import torch

    _drop_partial_imports()
    _PATCH_LIBRARY = torch.library.Library("torchvision", "DEF")
    _PATCH_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _PATCH_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


def import_open_clip() -> ModuleType:
    """Return the ``open_clip`` module (after making torchvision importable)."""
    import_torchvision()
    import open_clip

    return open_clip

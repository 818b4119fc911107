"""Device selection and the mixed-precision context of the frozen encoders."""

from __future__ import annotations

import contextlib
import re
from typing import ContextManager

import torch

from pfedmoap_cli.errors import ConfigError

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def resolve_device(choice: str) -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    Parameters
    ----------
    choice:
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.

    Raises
    ------
    ConfigError
        CUDA was asked for but is not available, or the value is unknown.
    """
    value = str(choice).strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = _CUDA_INDEX.match(value)
    if value == "cuda" or match:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {choice}: CUDA is not available on this machine; use --device cpu (or auto)")
        if match and int(match.group(1)) >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "pick an index below that or use --device cuda"
            )
        return torch.device(value)
    raise ConfigError(f"unknown --device {choice!r}; use auto, cpu, cuda or cuda:N")


def autocast_context(device: torch.device, amp: bool) -> ContextManager:
    """bf16 autocast on CUDA when ``amp`` is set, a no-op otherwise.

    CPU autocast is deliberately not used: bf16 on the project's CPUs was
    slower than fp32 and would change the numbers the tests compare.
    """
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_tag(device: torch.device, amp: bool) -> str:
    """Short name of the arithmetic the frozen encoders use (part of cache keys)."""
    return "bf16-autocast" if amp and device.type == "cuda" else f"fp32-{device.type}"

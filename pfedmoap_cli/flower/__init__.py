"""The Flower runtime: the same methods as a Flower app (ServerApp + ClientApp).

A thin layer beside :mod:`pfedmoap_cli.engine`: it decides where each method
hook runs (the server's process, a Ray worker of Flower's simulation runtime,
or a SuperNode on another host), never what it computes. Sampling, seeding,
metric rows and checkpoints are the engine's own code.

Importing this package does not import Flower; :func:`require_flower` does,
and names the fix when the ``flower`` extra is not installed.
"""

from __future__ import annotations

import os

from pfedmoap_cli.errors import ConfigError

#: Environment every Flower process started by the project gets: no telemetry,
#: no update check, and no runtime dependency installation (which would call
#: uv and replace the pinned CPU torch with a CUDA build).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower_environment() -> None:
    """Set :data:`FLOWER_ENV` in this process (before Flower is imported or started)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


def require_flower():
    """Import and return ``flwr``; a one-line error naming the fix when it is missing."""
    quiet_flower_environment()
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the Flower engine needs the 'flower' extra; install it with: pip install -c constraints.txt -e '.[flower]' (Python >= 3.11)"
        ) from None
    return flwr

"""Dataset recipes: the declarative defaults in ``data_recipes/<dataset>.toml``.

A recipe's ``[partition]`` table gives the defaults of ``pfedmoap partition``
for that dataset and its ``[train]`` table those of ``pfedmoap train`` (the
settings of the dataset's paper table). The folder is ``PFEDMOAP_RECIPES``
when set, else ``data_recipes/`` beside the package (a source checkout or an
editable install), else the copy a regular install carries inside the
package (``setup.py`` puts it there at build time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pfedmoap_cli.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def recipes_dir() -> Path:
    """The folder holding the recipe files."""
    override = os.environ.get("PFEDMOAP_RECIPES")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent
    checkout = package.parent / "data_recipes"
    if checkout.is_dir():
        return checkout
    return package / "data_recipes"


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; check the path")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path} is not valid TOML ({error}); fix the file") from None


def load_recipe(dataset: str) -> dict[str, Any]:
    """The recipe of ``dataset`` as a dict (empty when the dataset has none)."""
    path = recipes_dir() / f"{dataset}.toml"
    return read_toml(path, "recipe") if path.is_file() else {}

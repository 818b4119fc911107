"""Federated methods, one file each; importing this package registers them all."""

from pfedmoap_cli.methods import coop, promptfl, zsclip  # noqa: F401
from pfedmoap_cli.methods import pfedmoap  # noqa: F401

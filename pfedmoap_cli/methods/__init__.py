"""Federated methods, one file each; importing this package registers them all."""

from pfedmoap_cli.methods import coop, promptfl, zsclip  # noqa: F401
from pfedmoap_cli.methods import pfedmoap  # noqa: F401
from pfedmoap_cli.methods import fedamp, fedotp, fedper, fedprox, pfedprompt, promptfl_ft  # noqa: F401  (Table 1 baselines)

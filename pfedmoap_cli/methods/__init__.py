"""Federated methods, one file each; importing this package registers them all.

The Table-1 methods, pFedMoAP and the five later methods of PROTOCOL-MORE.md.
Methods of other packages are added through the ``pfedmoap.methods``
entry-point group; :func:`pfedmoap_cli.methods.base.method_names` and
:func:`~pfedmoap_cli.methods.base.get_method` load them (once) the first time
the registry is read. See :mod:`pfedmoap_cli.methods.base`.
"""

from pfedmoap_cli.methods import coop, promptfl, zsclip  # noqa: F401
from pfedmoap_cli.methods import pfedmoap  # noqa: F401
from pfedmoap_cli.methods import fedamp, fedotp, fedper, fedprox, pfedprompt, promptfl_ft  # noqa: F401  (Table 1 baselines)
from pfedmoap_cli.methods import fedcocoop, fedkgcoop, fedpgp, fedtpg, promptfolio  # noqa: F401  (PROTOCOL-MORE.md)

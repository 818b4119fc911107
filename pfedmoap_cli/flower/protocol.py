"""What the server and the nodes say to each other: message types and record names.

Every message carries a ``run`` record (the run id, the resolved settings, the
partition's sha256 and the run's fingerprint), so a node can open the run from
any single message: a SuperNode may start a fresh ClientApp process for each
one, and a restarted node must not depend on a handshake it missed.

* ``query``: the handshake. The node answers with its client id, or refuses
  with a one-line reason (a ``node`` record with ``refused`` set).
* ``train``: one client's local update. Down: ``download`` (the method's
  :meth:`~pfedmoap_cli.methods.base.FederatedMethod.client_download`) and
  ``round``; up: ``upload`` and the ``result`` metrics.
* ``evaluate``: score the client after the round's aggregation. Down: the
  method's evaluation download and ``round`` (with ``trained``: whether its
  update of this round was aggregated); up: the ``score`` metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfedmoap_cli.engine.settings import TrainSettings, run_fingerprint, settings_from_json

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"

RUN_RECORD = "run"
ROUND_RECORD = "round"
NODE_RECORD = "node"
DOWNLOAD_RECORD = "download"
UPLOAD_RECORD = "upload"
RESULT_RECORD = "result"
SCORE_RECORD = "score"


@dataclass(frozen=True)
class RunInfo:
    """What identifies the run a message belongs to."""

    run_id: str
    settings: TrainSettings
    partition_sha256: str
    fingerprint: str

    @classmethod
    def of(cls, run_id: str, settings: TrainSettings, partition_sha256: str) -> "RunInfo":
        return cls(run_id, settings, partition_sha256, run_fingerprint(settings, partition_sha256))

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "settings": self.settings.to_json(),
            "partition_sha256": self.partition_sha256,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict) -> "RunInfo":
        return cls(str(data["run_id"]), settings_from_json(data["settings"]), str(data["partition_sha256"]), str(data["fingerprint"]))


class Refusal(Exception):
    """A node cannot take part in this run; the message is the one-line reason.

    ``client_id`` is the client the node holds, when that much is known.
    """

    def __init__(self, reason: str, client_id: int | None = None) -> None:
        super().__init__(reason)
        self.client_id = client_id

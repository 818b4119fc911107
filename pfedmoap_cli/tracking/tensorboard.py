"""``--report-to tensorboard``: event files in ``runs/<id>/tensorboard/`` (view: ``tensorboard --logdir WORKSPACE/runs``).

Each round is one step (the round index): the scalars of
:mod:`~pfedmoap_cli.tracking.summary` and a histogram ``accuracy/clients`` of
the per-client test accuracies. The settings are a text summary
``settings`` and an hparams entry (step 0).

Resume writes to the same folder. When it holds events already, the writer
opens with ``purge_step`` = the first round it logs, so TensorBoard drops
any older event at that step or later: a round retrained after a fallback (or
logged just before a crash, ahead of tracking.json) shows once, with the
values of its last training.
"""

from __future__ import annotations

from typing import Any, Mapping

from pfedmoap_cli.tracking.base import TrackedRun, Tracker, TrackerBackend, logged_rounds

LOG_DIR = "tensorboard"


def settings_markdown(params: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in params.items()]
    return "\n".join(lines)


class _TensorBoardRun(TrackerBackend):
    def __init__(self, run: TrackedRun, log_dir_name: str, first_round: int, purge: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir_name = log_dir_name
        self.first_round = first_round
        self.writer = SummaryWriter(str(run.paths.root / log_dir_name), purge_step=first_round if purge else None)
        if first_round == 0:
            self._write_settings(run.hyperparameters)

    def _write_settings(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("settings", settings_markdown(params), global_step=0)
        for summary in hparams(dict(params), {"accuracy/mean": 0.0, "accuracy/weighted": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def identity(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir_name}

    def log(self, round_index: int, scalars: Mapping[str, float], accuracies: Mapping[int, float]) -> None:
        import numpy as np

        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=round_index)
        if accuracies:
            self.writer.add_histogram("accuracy/clients", np.asarray([accuracies[c] for c in sorted(accuracies)]), global_step=round_index)
        self.writer.flush()

    def close(self, complete: bool) -> None:
        self.writer.close()


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, run: TrackedRun, entry: dict[str, Any] | None, completed_rounds: int) -> TrackerBackend:
        name = str((entry or {}).get("log_dir") or LOG_DIR)
        folder = run.paths.root / name
        has_events = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        # Without events there is nothing to continue: log every complete round again.
        first = min(logged_rounds(entry), completed_rounds) if has_events else 0
        return _TensorBoardRun(run, name, first, purge=has_events)

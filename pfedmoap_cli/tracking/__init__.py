"""Experiment tracking (``--report-to``): TensorBoard, MLflow and Weights & Biases.

A tracker follows a run round by round through the run observer hook of
:func:`pfedmoap_cli.engine.runner.execute_run`, so every runtime (in-process
and Flower) is covered the same way. What it logs is read back from the run's
own files (each round's manifest rows), never from the trainer's memory.

Nothing here imports a tracking library until a tracker is asked for:
:mod:`pfedmoap_cli.tracking.registry` names them and imports them lazily.

Modules, one job each: ``registry`` (names, extras, ``--report-to`` parsing),
``base`` (the tracker interface and its resume rules), ``state``
(``runs/<id>/tracking.json``), ``rows`` (a round's rows from its manifest),
``summary`` (the per-round numbers), ``params`` (settings as hyperparameters),
and one module per library.
"""

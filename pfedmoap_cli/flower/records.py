"""Method state <-> Flower records, and the bytes a record carries."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from pfedmoap_cli.methods.base import State


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding every tensor of ``state`` (copied to the CPU, dtype and shape kept)."""
    record = ArrayRecord()
    for key, tensor in state.items():
        record[key] = Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))
    return record


def record_to_state(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    """The tensors of an ArrayRecord, on ``device``."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)).to(device) for key, array in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Tensor bytes carried by a record: elements x element size of every array.

    The same quantity as :func:`pfedmoap_cli.methods.base.tensor_bytes` of the
    state it was built from (the ``.npy`` headers Flower adds are not payload).
    """
    total = 0
    for array in record.values():
        count = int(np.prod(array.shape)) if len(array.shape) else 1
        total += count * np.dtype(array.dtype).itemsize
    return total


def json_config(**values: Any) -> ConfigRecord:
    """A ConfigRecord whose values are JSON text (nested settings survive unchanged)."""
    return ConfigRecord({key: json.dumps(value, sort_keys=True) for key, value in values.items()})


def read_json_config(record: ConfigRecord) -> dict[str, Any]:
    """The values of a :func:`json_config` record."""
    return {key: json.loads(str(value)) for key, value in record.items()}

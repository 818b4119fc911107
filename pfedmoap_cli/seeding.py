"""Seeds derived from the experiment seed, so no result depends on call order.

Every random draw of a run (client sampling of round t, the data order and
augmentation of client i in round t, the initial prompt) gets its own seed
computed from the experiment seed and a purpose tag. Round t therefore draws
the same numbers whether the run went straight through or was resumed, and a
client's update does not depend on which clients ran before it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the experiment seed and any labels (stable across runs and platforms)."""
    text = "/".join([str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU torch generator seeded with :func:`derive_seed`."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, *parts))
    return generator


def sample_clients(num_clients: int, frac: float, seed: int, round_index: int) -> list[int]:
    """The participants of a round: ``max(floor(frac * N), 1)`` clients without replacement, sorted."""
    count = max(int(np.floor(frac * num_clients + 1e-9)), 1)
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "participants", round_index))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))

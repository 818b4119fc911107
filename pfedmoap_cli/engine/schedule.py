"""Which rounds score the clients (``--eval-every``).

Kept free of torch: ``report`` and the trackers import it.
"""

from __future__ import annotations


def is_evaluated_round(round_index: int, total_rounds: int, eval_every: int) -> bool:
    """Whether round ``round_index`` (0-based) of a run of ``total_rounds`` scores its clients.

    Rounds ``r`` with ``(r + 1) % eval_every == 0`` do, and the final round
    always does (the tables report it).
    """
    return (round_index + 1) % max(eval_every, 1) == 0 or round_index == total_rounds - 1


def evaluated_rounds(total_rounds: int, eval_every: int, completed: int | None = None) -> list[int]:
    """The evaluated rounds among the first ``completed`` (default: all) of a run."""
    end = total_rounds if completed is None else min(completed, total_rounds)
    return [r for r in range(end) if is_evaluated_round(r, total_rounds, eval_every)]

"""How a round scales with the number of clients: time, evaluation, memory, checkpoint bytes.

The synthetic world (``pfedmoap partition --dataset synthetic``) split IID over
N = 10, 100 and 1,000 clients, with the images per class grown with N so that
every client holds about the same data (``--train-per-client``,
``--test-per-client``). Every round samples 10 participants (frac = 10 / N),
so the training work per round is the same at every N; what grows with N is
what the engine does for all clients: evaluation (every client is scored on
its own test set each evaluated round, by definition) and checkpoints.

Each (N, method) runs in a fresh subprocess, so peak memory (the process's
peak resident set size, ``getrusage``) does not carry over from one to the
next. Runs go through the engine's entry point (``execute_run``, what
``pfedmoap train`` calls) on the tiny-vit backbone with random weights, one
thread; benchmarks/_measure.py times each round whole, times
``Federation.evaluate_round`` within it, and sums the bytes of the files the round
created or replaced under the run folder. Round 0 is a warm-up and is left
out; the per-round numbers are means over the remaining rounds (so a
``--eval-every`` that skips evaluation shows as a lower mean).

Columns: ``round_s`` whole round, ``train_s`` = round minus evaluation
(local updates, aggregation, metrics, checkpoint writing), ``eval_s`` and
``eval_ms_per_client``, ``peak_rss_mb``, ``ckpt_mb_per_round`` and
``ckpt_files_per_round``. The table is printed as markdown and saved as
``bench_scale.csv`` and ``bench_scale.md`` under ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --out bench-out
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --quick --out bench-out   # N = 10, 100
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

#: Printed before a worker's result, so it can be told apart from anything else it prints.
RESULT_TAG = "RESULT "
SYNTHETIC_CLASSES = 36 * 3  # classes x domains: images per class count once per domain


@dataclass(frozen=True)
class ScaleRow:
    """One line of the table: one method at one N."""

    clients: int
    method: str
    participants: int
    rounds: int
    round_s: float
    train_s: float
    eval_s: float
    eval_ms_per_client: float
    peak_rss_mb: float
    ckpt_mb_per_round: float
    ckpt_files_per_round: float


COLUMNS = tuple(f.name for f in fields(ScaleRow))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def per_class(clients: int, per_client: int) -> int:
    """Synthetic images per (domain, class) that give every client about ``per_client`` of them."""
    return max(1, math.ceil(clients * per_client / SYNTHETIC_CLASSES))


# ---- one (N, method), in its own process --------------------------------------------------------


def run_worker(args) -> ScaleRow:
    """Partition, train and measure one method at one N in this process."""
    import torch

    from _measure import measure_run
    from pfedmoap_cli import api
    from pfedmoap_cli.engine.settings import TrainSettings

    torch.set_num_threads(1)
    n = args.clients[0]
    participants = min(args.participants, n)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workspace = Path(tmp) / "ws"
        options = {"train_per_class": per_class(n, args.train_per_client), "test_per_class": per_class(n, args.test_per_client)}
        part = api.partition(
            dataset="synthetic", workspace=workspace, data_root=Path(tmp) / "data", iid=True, clients=n, seed=1, dataset_options=options
        )
        method_options = {"num_experts": min(9, n - 1), "gating_dim": 16, "gating_heads": 4} if args.method == "pfedmoap" else {}
        settings = TrainSettings(
            method=args.method, rounds=args.rounds + 1, local_epochs=args.local_epochs, frac=participants / n,
            batch_size=16, n_ctx=args.n_ctx, backbone="tiny-vit", pretrained="none", device="cpu",
            image_pipeline=args.image_pipeline, batched=args.batched, eval_every=args.eval_every, keep_rounds=args.keep_rounds,
            method_options=method_options,
        )
        rounds = measure_run(workspace, Path(tmp) / "data", settings, part.path, run_id=f"scale-{args.method}-{n}")[1:]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    eval_s = mean([r.eval_seconds for r in rounds])
    return ScaleRow(
        clients=n, method=args.method, participants=participants, rounds=len(rounds),
        round_s=mean([r.seconds for r in rounds]), train_s=mean([r.train_seconds for r in rounds]), eval_s=eval_s,
        eval_ms_per_client=1000 * eval_s / n, peak_rss_mb=peak_rss_mb(),
        ckpt_mb_per_round=mean([r.checkpoint_bytes for r in rounds]) / 2**20,
        ckpt_files_per_round=mean([r.checkpoint_files for r in rounds]),
    )


# ---- the driver ---------------------------------------------------------------------------------


def worker_command(args, n: int, method: str) -> list[str]:
    """This script, as a worker for one (N, method), with the run settings passed on."""
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--clients", str(n), "--methods", method,
        "--rounds", str(args.rounds), "--participants", str(args.participants), "--local-epochs", str(args.local_epochs),
        "--n-ctx", str(args.n_ctx), "--train-per-client", str(args.train_per_client), "--test-per-client", str(args.test_per_client),
        "--image-pipeline", args.image_pipeline, "--batched" if args.batched else "--per-client",
        "--eval-every", str(args.eval_every), "--keep-rounds", args.keep_rounds,
    ]


def run_in_subprocess(args, n: int, method: str) -> ScaleRow:
    """One row, measured in a fresh interpreter (its peak memory is its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(worker_command(args, n, method), capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"worker N={n} {method} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return ScaleRow(**json.loads(lines[-1][len(RESULT_TAG):]))


def markdown(rows: list[ScaleRow]) -> str:
    """The rows as a markdown table (COLUMNS in order)."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(getattr(row, c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(rows: list[ScaleRow], out: Path, header: str) -> None:
    """``<out>/bench_scale.csv`` (COLUMNS) and ``<out>/bench_scale.md`` (the header line and the table)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_scale.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    (out / "bench_scale.md").write_text(f"{header}\n\n{markdown(rows)}\n", encoding="utf-8")


def parse_args(argv=None):
    """The command line; ``--worker`` (internal) measures the one N and method given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--clients", type=ints, default=None, help="comma-separated N (default 10,100,1000; --quick: 10,100)")
    parser.add_argument("--methods", default="promptfl,pfedmoap", type=lambda s: s.split(","))
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 and one timed round: the smoke test's run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up round (default 3; --quick: 1)")
    parser.add_argument("--participants", type=int, default=10, help="clients sampled per round (frac = this / N)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--train-per-client", type=int, default=8)
    parser.add_argument("--test-per-client", type=int, default=4)
    parser.add_argument("--image-pipeline", default="tensor", choices=("tensor", "pil"))
    parser.add_argument("--batched", dest="batched", action="store_true", default=True)
    parser.add_argument("--per-client", dest="batched", action="store_false")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--keep-rounds", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench_scale.csv and bench_scale.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.clients = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.method = args.methods[0]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(asdict(run_worker(args))))
        return
    started = time.perf_counter()
    rows = []
    for n in args.clients:
        for method in args.methods:
            rows.append(run_in_subprocess(args, n, method))
            print(f"  N={n} {method}: {rows[-1].round_s:.2f} s/round", file=sys.stderr)
    header = (
        f"synthetic world, IID, ~{args.train_per_client} train / ~{args.test_per_client} test images per client, "
        f"{args.participants} participants per round, tiny-vit (random weights), n_ctx {args.n_ctx}, "
        f"{args.local_epochs} local epoch(s), image_pipeline={args.image_pipeline}, batched={args.batched}, "
        f"eval_every={args.eval_every}, keep_rounds={args.keep_rounds}; mean of {args.rounds} round(s) after a warm-up round, "
        f"1 thread, one subprocess per row; total {time.perf_counter() - started:.0f} s"
    )
    write_outputs(rows, args.out, header)
    print(header)
    print(markdown(rows))
    print(f"saved {args.out / 'bench_scale.csv'} and {args.out / 'bench_scale.md'}")


if __name__ == "__main__":
    main()

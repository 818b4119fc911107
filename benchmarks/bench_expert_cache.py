"""Per-round wall time of pFedMoAP: shared expert-feature cache vs re-encoding per client.

Every expert's class features depend only on its prompt and the class names
(PROTOCOL.md section 3, cost note), so ``prepare_round`` encodes the round's
expert prompts once, in one batched text-encoder pass, and every participant
reuses them (``share_expert_features=true``, the default). The alternative,
``share_expert_features=false``, re-encodes the K expert prompts inside each
client's update -- what the reference code does.

Runs real federation rounds (the engine's round loop, evaluation and
checkpoints included) on the synthetic world with a tiny randomly initialised
backbone. Both variants advance round by round in lockstep in the same
process, so machine noise hits them alike; round 0 (no client has experts yet)
is excluded from the medians. Also reports the time spent in the method's
training hooks alone (``prepare_round`` + ``train_client``), and checks that
both variants give the same accuracies. Quote the ratios, not the seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_expert_cache.py --clients 9 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace


class Timed:
    """A federation whose method's training hooks are timed."""

    def __init__(self, settings: TrainSettings, workspace: Workspace, part, sha: str, tag: str) -> None:
        session = open_session(settings, part, sha, Path("data"), workspace.features_cache_dir, progress=False)
        self.federation = Federation(session, tag, RunPaths(workspace.run_dir(tag)), progress=False)
        self.state, self.clients = self.federation.initial_state(), {}
        self.round_times: list[float] = []
        self.hook_times: list[float] = []
        self._hook = 0.0
        method = self.federation.method
        for name in ("prepare_round", "train_client"):
            setattr(method, name, self._timed(getattr(method, name)))

    def _timed(self, hook):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._hook += time.perf_counter() - start

        return wrapper

    def round(self, round_index: int) -> None:
        self._hook = 0.0
        start = time.perf_counter()
        self.state, self.clients, _ = self.federation.run_round(round_index, self.state, self.clients)
        self.round_times.append(time.perf_counter() - start)
        self.hook_times.append(self._hook)

    def accuracies(self) -> pd.Series:
        metrics = pd.read_csv(self.federation.paths.metrics_csv)
        acc = metrics[(metrics.metric == "accuracy") & (metrics.split == "test")]
        return acc.sort_values(["round", "client_id"])["value"].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant (round 0 is not timed)")
    parser.add_argument("--clients", type=int, default=9, help="36 synthetic classes: 9 clients own 4 each")
    parser.add_argument("--experts", type=int, default=8, help="K, non-local experts per client (8 = everyone else)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--backbone", default="tiny-vit")
    parser.add_argument("--gating-dim", type=int, default=16, help="must divide the backbone's D (32 for the tiny ones)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp))
        source = open_dataset("synthetic", Path("data"))
        part = build_partition(source, PartitionSettings("pathological", args.clients, seed=1, shots=args.shots), {})
        path, _ = save_partition(part, workspace.partitions_dir)
        part, sha = load_partition(path)
        runs = {}
        for shared in (True, False):
            settings = TrainSettings(
                method="pfedmoap", rounds=args.rounds, local_epochs=args.local_epochs, batch_size=16, n_ctx=args.n_ctx,
                backbone=args.backbone, pretrained="none", device="cpu",
                method_options={"num_experts": args.experts, "gating_dim": args.gating_dim, "gating_heads": 4, "share_expert_features": shared},
            )
            runs[shared] = Timed(settings, workspace, part, sha, "shared" if shared else "per-client")
        for round_index in range(args.rounds):
            for run in runs.values():
                run.round(round_index)
        same = runs[True].accuracies().to_numpy() - runs[False].accuracies().to_numpy()
    med = statistics.median
    shared, per_client = runs[True], runs[False]
    print(
        f"backbone {args.backbone}, {args.clients} clients (all sampled), K={args.experts}, {len(part.class_names)} classes, "
        f"n_ctx {args.n_ctx}, {args.local_epochs} local epoch(s), {args.shots} shots; median of rounds 1..{args.rounds - 1}"
    )
    for label, key in (("whole round", "round_times"), ("training hooks", "hook_times")):
        a, b = med(getattr(shared, key)[1:]), med(getattr(per_client, key)[1:])
        print(f"{label:15s}: shared cache {a:.3f} s, per-client re-encoding {b:.3f} s -> speed-up x{b / a:.2f}")
    print(f"max |accuracy difference| between the variants: {abs(same).max():.2e}")


if __name__ == "__main__":
    main()

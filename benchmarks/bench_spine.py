"""Per-round wall time: feature cache on/off and EOT truncation on/off.

Runs real federation rounds (PromptFL) on the synthetic world with a tiny
backbone and reports, from the same process and machine:

* round time when test features come from the cache vs when every round has
  to re-encode the test images (what the engine would do without the cache);
* round time with the prompt text encoder truncated after the last EOT token
  vs running the full 77-token context.

Timings are medians over rounds; quote the ratios, not the seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spine.py --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pfedmoap_cli.artifacts.partition import save_partition, load_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.model.features import compute_image_features


def round_times(settings: TrainSettings, workspace: Workspace, part, sha, recompute_features: bool, tag: str) -> list[float]:
    session = open_session(settings, part, sha, Path("data"), workspace.features_cache_dir, progress=False)
    federation = Federation(session, tag, RunPaths(workspace.run_dir(tag)), progress=False)
    state, clients = federation.initial_state(), {}
    times = []
    for round_index in range(settings.rounds):
        start = time.perf_counter()
        if recompute_features:
            samples = session.test_samples
            session.test_features = compute_image_features(
                session.clip, lambda i: session.source.load_image(samples[i]), len(samples), progress=False
            )
        state, clients, _ = federation.run_round(round_index, state, clients)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--backbone", default="tiny-vit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp))
        source = open_dataset("synthetic", Path("data"))
        part = build_partition(source, PartitionSettings("pathological", args.clients, seed=1, shots=4), {})
        path, _ = save_partition(part, workspace.partitions_dir)
        part, sha = load_partition(path)
        base = TrainSettings(
            method="promptfl", rounds=args.rounds, local_epochs=1, batch_size=16, n_ctx=16,
            backbone=args.backbone, pretrained="none", device="cpu",
        )
        cached = round_times(base, workspace, part, sha, recompute_features=False, tag="cached")
        uncached = round_times(base, workspace, part, sha, recompute_features=True, tag="uncached")
        full_context = round_times(dataclasses.replace(base, truncate_prompts=False), workspace, part, sha, False, "full")
    med = statistics.median
    print(f"backbone {args.backbone}, {args.clients} clients, {len(source.samples('test'))} test images, median of {args.rounds} rounds")
    print(f"round time, cached features      : {med(cached):.3f} s")
    print(f"round time, features recomputed  : {med(uncached):.3f} s  -> cache speed-up x{med(uncached) / med(cached):.2f}")
    print(f"round time, full 77-token context: {med(full_context):.3f} s  -> EOT truncation speed-up x{med(full_context) / med(cached):.2f}")


if __name__ == "__main__":
    main()

"""Per-round wall time in a Table-1-shaped setting: today's path vs the new one.

Builds a fake Flowers102 in CoOp's layout (102 classes, JPEG files, CoOp's
split file; benchmarks/_fixtures.py), partitions it as Table 1 does
(pathological, 10 clients x 16 shots of their own classes) with
``api.partition``, and trains real runs through the engine's entry point
(``execute_run``, what ``pfedmoap train`` calls) on a 224-px tiny ViT CLIP with
seeded random weights (n_ctx 16, batch 16, 1 local epoch, every client every
round). For each method, two runs on the same partition:

* old path: ``image_pipeline="pil"``, ``batched=False`` (every epoch decodes
  the JPEGs and augments with PIL; clients train one after another);
* new path: ``image_pipeline="tensor"``, ``batched=True`` (images decoded
  once, augmented as tensors; the sampled clients train in lock step).

A round is timed whole (local updates, aggregation, evaluation, checkpoints;
benchmarks/_measure.py); round 0 is a warm-up and is left out; the median of
the remaining rounds is compared. Both paths run in this process, with the
same thread count, their rounds taken in turn (old 0, new 0, old 1, new 1,
...), so a busy stretch of a shared machine slows both alike. The last line is the smallest
per-method ratio old / new: ``min speed-up X.XX``. Quote ratios, not seconds.

CPU (about 2-4 minutes on 1 thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_round.py

GPU, real-size backbones with random weights, 500-px photos, 5 local epochs::

    .venv/bin/python benchmarks/bench_round.py --device cuda --backbone RN50,ViT-B-16 \\
        --pretrained none --image-size 500 --local-epochs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _fixtures import BENCH_VIT, FakeFlowers, register_bench_models, write_fake_flowers
from _measure import RoundMeasure, measure_runs_in_turn, median_seconds
from pfedmoap_cli import api
from pfedmoap_cli.engine.settings import TrainSettings

#: The two paths compared: name -> (image_pipeline, batched).
PATHS = {"old": ("pil", False), "new": ("tensor", True)}


@dataclass(frozen=True)
class Measured:
    """Both paths of one method on one backbone."""

    method: str
    backbone: str
    old: list[RoundMeasure]
    new: list[RoundMeasure]

    @property
    def speed_up(self) -> float:
        return median_seconds(self.old) / median_seconds(self.new)


def method_options(method: str, backbone_dim: int, clients: int) -> dict:
    """pFedMoAP with K = every other client; its gating width must divide the backbone's D.

    Real backbones (D >= 128) keep the paper's d_g 128 / 8 heads; the tiny
    one (D = 32) uses 16 / 4, as benchmarks/bench_expert_cache.py does.
    """
    if method != "pfedmoap":
        return {}
    gating = {} if backbone_dim >= 128 else {"gating_dim": 16, "gating_heads": 4}
    return {"num_experts": clients - 1, **gating}


def embed_dim(backbone: str) -> int:
    """D of an open_clip architecture, read from its config without building it."""
    from pfedmoap_cli.compat import import_open_clip

    config = import_open_clip().get_model_config(backbone)
    return int(config["embed_dim"]) if config else 0


def measure_backbone(args, backbone: str, workspace: Path, data_root: Path, partition_path: Path) -> list[Measured]:
    """Old and new path of every method on ``backbone``, each method's two runs taking their rounds in turn."""
    measured = []
    for method in args.methods:
        base = TrainSettings(
            method=method, rounds=args.rounds + 1, local_epochs=args.local_epochs, frac=1.0, batch_size=args.batch_size,
            n_ctx=args.n_ctx, backbone=backbone, pretrained=args.pretrained, device=args.device,
            method_options=method_options(method, embed_dim(backbone), args.clients),
        )
        ids = {name: f"{backbone}-{method}-{name}" for name in PATHS}
        settings = {ids[name]: dataclasses.replace(base, image_pipeline=p, batched=b) for name, (p, b) in PATHS.items()}
        rounds = measure_runs_in_turn(workspace, data_root, settings, partition_path, threads=args.threads)
        for name, run_id in ids.items():
            print(f"  {backbone} {method:9s} {name} path: rounds {', '.join(f'{r.seconds:.2f}' for r in rounds[run_id])} s", file=sys.stderr)
        measured.append(Measured(method, backbone, rounds[ids["old"]], rounds[ids["new"]]))
    return measured


def parse_args(argv=None):
    """The command line (``--smoke``: the smallest run, for the smoke test)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="promptfl,pfedmoap", type=lambda s: s.split(","), help="comma-separated")
    parser.add_argument("--backbone", default=BENCH_VIT, type=lambda s: s.split(","), help=f"comma-separated open_clip names (default {BENCH_VIT})")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights from a seed (no download)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per run (one warm-up round comes on top)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=8, help="8 x 102 = 816 test images")
    parser.add_argument("--image-size", type=int, default=224, help="side of the fake JPEGs (500: about the real photos)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="smallest run that exercises everything (3 clients, 1 shot, 1 test image per class, 1 timed round)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.shots, args.test_per_class, args.rounds = 3, 1, 1, 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    register_bench_models()
    size = FakeFlowers(shots=args.shots, test_per_class=args.test_per_class, image_size=args.image_size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        data_root, workspace = Path(tmp) / "data", Path(tmp) / "ws"
        write_fake_flowers(data_root, size)
        part = api.partition(
            dataset="flowers102", workspace=workspace, data_root=data_root, pathological=True, clients=args.clients,
            shots=args.shots, seed=1,
        )
        results = [m for backbone in args.backbone for m in measure_backbone(args, backbone, workspace, data_root, part.path)]
    print(
        f"fake flowers102 (CoOp layout, {args.image_size}-px JPEGs): {part.num_classes} classes, {part.num_clients} clients x "
        f"{args.shots} shots of their own classes ({sum(part.train_sizes)} train images), {size.num_test} test images; "
        f"pretrained={args.pretrained}, n_ctx {args.n_ctx}, batch {args.batch_size}, {args.local_epochs} local epoch(s), "
        f"device {args.device}, {args.threads} thread(s); median of {args.rounds} round(s) after a warm-up round; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    print("| method | backbone | old path (pil, per client) s/round | new path (tensor, batched) s/round | speed-up |")
    print("|---|---|---|---|---|")
    for m in results:
        print(f"| {m.method} | {m.backbone} | {median_seconds(m.old):.3f} | {median_seconds(m.new):.3f} | {m.speed_up:.2f} |")
    print(f"min speed-up {min(m.speed_up for m in results):.2f}")


if __name__ == "__main__":
    main()

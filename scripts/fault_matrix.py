"""Damage a real workspace in one way at a time and see what the next command does.

Usage::

    .venv/bin/python scripts/fault_matrix.py [--out fault-matrix.md]

One small pFedMoAP run (synthetic data, tiny ViT, 3 clients, 3 rounds) is
trained unbroken, and once more stopped after 2 rounds. For every fault
below a fresh copy of the stopped workspace is damaged, and then the next
command (``train --resume``, or ``report``) runs through the installed
console script. Each outcome is one of:

* ``identical``: exit 0 and the finished run's metric rows and checkpoint
  tensors equal the unbroken run's exactly (damage repaired or bypassed);
* ``refused``: a non-zero exit with a one-line ``error: ...`` and no traceback;
* ``SILENT``: exit 0 with results that differ from the unbroken run's;
* ``CRASH``: anything else (a traceback, ``internal error``, a hang).

The table goes to stdout (and ``--out``). It is a measurement, not a test:
the tests that guard each rule are in tests/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

SCRIPT = Path(sys.executable).with_name("pfedmoap")
RUN = "damaged-run"
PARTITION = ("partition", "--dataset", "synthetic", "--iid", "--clients", "3", "--seed", "2",
             "--option", "train_per_class=1", "--option", "test_per_class=1")
TRAIN = ("train", "--method", "pfedmoap", "--rounds", "3", "--local-epochs", "1", "--frac", "0.67", "--n-ctx", "2",
         "--batch-size", "8", "--lr", "0.05", "--backbone", "tiny-vit", "--pretrained", "none", "--device", "cpu",
         "--gating-dim", "16", "--gating-heads", "4", "--eval-batch-size", "64", "--run-id", RUN,
         "--keep-rounds", "all")  # every round on disk, so a damaged last round can fall back one round
RESUME = ("train", "--run-id", RUN, "--resume")


def pfedmoap(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE"}}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(SCRIPT), "--quiet", "--workspace", str(workspace), *args], capture_output=True, text=True, timeout=600, env=env)


def run_dir(workspace: Path) -> Path:
    return workspace / "runs" / RUN


def results(workspace: Path) -> tuple[list[list[str]], dict[str, dict[str, torch.Tensor]]]:
    root = run_dir(workspace)
    with open(root / "metrics.csv", newline="") as handle:
        rows = [row[1:] for row in csv.reader(handle)]
    tensors = {str(p.relative_to(root)): load_file(str(p)) for p in sorted((root / "checkpoints").rglob("*.safetensors"))}
    return rows, tensors


def same(a, b) -> bool:
    (rows_a, ckpt_a), (rows_b, ckpt_b) = a, b
    if rows_a != rows_b or sorted(ckpt_a) != sorted(ckpt_b):
        return False
    return all(sorted(ckpt_a[n]) == sorted(ckpt_b[n]) and all(torch.equal(ckpt_a[n][k], ckpt_b[n][k]) for k in ckpt_b[n]) for n in ckpt_b)


# ---- the faults ------------------------------------------------------------------------------------
def flip_payload(path: Path) -> None:
    """Flip bytes near the end of a file (safetensors payload, not its header)."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 40, len(data) - 8):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def round_dir(ws: Path, r: int) -> Path:
    return run_dir(ws) / "checkpoints" / f"round-{r:04d}"


def first_client_file(ws: Path, r: int) -> Path:
    return sorted(round_dir(ws, r).glob("client-*.safetensors"))[0]


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2))


def drop_lines(path: Path, keep: Callable[[int, str], bool]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for i, line in enumerate(lines) if keep(i, line)))


def first_accuracy_row(path: Path) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines()) if ",test,accuracy," in line)


def swap_class_names(ws: Path) -> None:
    partition = next((ws / "partitions").glob("*.json"))
    record = json.loads(partition.read_text())
    names = record.get("classnames") or record.get("class_names")
    key = "classnames" if "classnames" in record else "class_names"
    record[key] = [names[1], names[0], *names[2:]]
    partition.write_text(json.dumps(record))


def old_lock(ws: Path, content: bytes, age: float = 60.0) -> None:
    """A lock file with ``content``, last written ``age`` seconds ago."""
    (ws / "locks").mkdir(exist_ok=True)
    lock = ws / "locks" / f"{RUN}.lock"
    lock.write_bytes(content)
    then = time.time() - age
    os.utime(lock, (then, then))


FAULTS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    # name: (next command, damage(workspace, other_workspace))
    "client checkpoint: payload bytes flipped": ("resume", lambda ws, _: flip_payload(first_client_file(ws, 1))),
    "global checkpoint: payload bytes flipped": ("resume", lambda ws, _: flip_payload(round_dir(ws, 1) / "global.safetensors")),
    "client checkpoint: copied from another run": ("resume", lambda ws, other: shutil.copy(first_client_file(other, 1), first_client_file(ws, 1))),
    "client checkpoint: copied from an earlier round": ("resume", lambda ws, _: shutil.copy(first_client_file(ws, 0), round_dir(ws, 1) / first_client_file(ws, 0).name)),
    "client checkpoint: deleted": ("resume", lambda ws, _: first_client_file(ws, 1).unlink()),
    "client checkpoint: duplicated under another client": ("resume", lambda ws, _: shutil.copy(first_client_file(ws, 1), round_dir(ws, 1) / "client-0099.safetensors")),
    "global checkpoint: deleted": ("resume", lambda ws, _: (round_dir(ws, 1) / "global.safetensors").unlink()),
    "feature cache entry: payload bytes flipped": ("resume", lambda ws, _: [flip_payload(p) for p in (ws / "cache").rglob("*.safetensors")]),
    "metrics.csv: deleted": ("resume", lambda ws, _: (run_dir(ws) / "metrics.csv").unlink()),
    "metrics.csv: last line deleted": ("resume", lambda ws, _: drop_lines(run_dir(ws) / "metrics.csv", lambda i, line: i < len((run_dir(ws) / "metrics.csv").read_text().splitlines()) - 1)),
    "metrics.csv: one accuracy row deleted": ("resume", lambda ws, _: drop_lines(run_dir(ws) / "metrics.csv", lambda i, line, n=first_accuracy_row(run_dir(ws) / "metrics.csv"): i != n)),
    "metrics.csv: garbage line appended": ("resume", lambda ws, _: (run_dir(ws) / "metrics.csv").write_text((run_dir(ws) / "metrics.csv").read_text() + "garbage,,\x00\n")),
    "metrics.csv: garbage line, then report": ("report", lambda ws, _: (run_dir(ws) / "metrics.csv").write_text((run_dir(ws) / "metrics.csv").read_text() + "garbage,,\x00\n")),
    "metrics.csv: one accuracy row deleted, then report": ("report", lambda ws, _: drop_lines(run_dir(ws) / "metrics.csv", lambda i, line, n=first_accuracy_row(run_dir(ws) / "metrics.csv"): i != n)),
    "progress.json: completed_rounds -1": ("resume", lambda ws, _: edit_json(run_dir(ws) / "progress.json", lambda r: r.update(completed_rounds=-1))),
    "progress.json: completed_rounds 99": ("resume", lambda ws, _: edit_json(run_dir(ws) / "progress.json", lambda r: r.update(completed_rounds=99))),
    "progress.json: garbage": ("resume", lambda ws, _: (run_dir(ws) / "progress.json").write_text("{not json")),
    "run.json: lr edited": ("resume", lambda ws, _: edit_json(run_dir(ws) / "run.json", lambda r: r["settings"].update(lr=0.5))),
    "run.json: garbage": ("resume", lambda ws, _: (run_dir(ws) / "run.json").write_text("[1, 2")),
    "run.json: a key missing": ("resume", lambda ws, _: edit_json(run_dir(ws) / "run.json", lambda r: r.pop("settings"))),
    "partition: two class names swapped": ("resume", lambda ws, _: swap_class_names(ws)),
    "partition: two class names swapped, then a new run": ("new run", lambda ws, _: swap_class_names(ws)),
    "lock file: empty, left a minute ago by a full disk": ("resume", lambda ws, _: old_lock(ws, b"")),
    "lock file: garbage, a minute old": ("resume", lambda ws, _: old_lock(ws, b"\x00\x01garbage")),
    "lock file: garbage, just written (a live writer?)": ("resume", lambda ws, _: old_lock(ws, b"\x00\x01garbage", age=0)),
    "temp file of an interrupted write left": ("resume", lambda ws, _: (round_dir(ws, 1) / ".client-0001.safetensors.abc123.tmp").write_bytes(b"partial")),
    "workspace moved to another folder": ("moved", lambda ws, _: None),
}


def classify(done: subprocess.CompletedProcess, finished_same: bool | None) -> str:
    err = done.stderr.strip()
    if "Traceback" in err or "internal error" in err:
        return "CRASH"
    if done.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        return "refused" if lines and lines[-1].startswith("error:") else "CRASH"
    if finished_same is None:
        return "ok"
    return "identical" if finished_same else "SILENT"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as scratch:
        scratch = Path(scratch)
        unbroken, stopped, other = scratch / "unbroken", scratch / "stopped", scratch / "other"
        for ws, extra in ((unbroken, ()), (stopped, ("--stop-after", "2"))):
            for command in (PARTITION, (*TRAIN, *extra)):
                done = pfedmoap(ws, *command)
                assert done.returncode == 0, done.stderr
        for command in (PARTITION, (*TRAIN, "--seed", "5", "--stop-after", "2")):
            done = pfedmoap(other, *command)
            assert done.returncode == 0, done.stderr
        reference = results(unbroken)
        rows = []
        for name, (kind, damage) in FAULTS.items():
            ws = scratch / "case"
            shutil.rmtree(ws, ignore_errors=True)
            if kind == "moved":  # copied, then the copy renamed: its old absolute paths point nowhere
                shutil.rmtree(scratch / "elsewhere", ignore_errors=True)
                shutil.copytree(stopped, scratch / "before-move")
                (scratch / "before-move").rename(scratch / "elsewhere")
                ws = scratch / "elsewhere"
            else:
                shutil.copytree(stopped, ws)
            damage(ws, other)
            if kind == "report":
                done = pfedmoap(ws, "report")
                outcome = classify(done, None)
                if outcome == "ok":
                    listed, warned = RUN in done.stdout, f"run {RUN} left out" in done.stderr
                    outcome = "SILENT (averaged)" if listed else "left out with a warning" if warned else "SILENT (dropped)"
            elif kind == "new run":
                done = pfedmoap(ws, *TRAIN[:-2], "--run-id", "fresh", "--seed", "9")
                outcome = classify(done, None)
                if outcome == "ok":
                    outcome = "SILENT (trained)"
            else:
                done = pfedmoap(ws, *RESUME)
                finished = None
                if done.returncode == 0:
                    try:
                        finished = same(results(ws), reference)
                    except Exception:  # noqa: BLE001 (a measurement: unreadable results count as different)
                        finished = False
                outcome = classify(done, finished)
            if kind == "moved":
                shutil.rmtree(ws, ignore_errors=True)
            first = (done.stderr.strip().splitlines() or [""])[-1][:150]
            rows.append((name, kind, outcome, done.returncode, first))
            print(f"{outcome:10} {name}", file=sys.stderr, flush=True)
    table = ["| fault | next command | outcome | exit | last stderr line |", "|---|---|---|---|---|"]
    table += [f"| {n} | {k} | {o} | {c} | {f.replace('|', '/')} |" for n, k, o, c, f in rows]
    text = "\n".join(table) + f"\n\n{len(rows)} faults in {time.time() - started:.0f} s\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoded training images: decoded once, kept in memory or spilled to a verified disk cache, batched like the PIL path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pfedmoap_cli.data.decoded_images import DecodedImageSettings, DecodedImageStore
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.engine.client_data import ClientTrainImages, epoch_batches
from pfedmoap_cli.engine.decoded_batches import decoded_epoch_batches
from pfedmoap_cli.model.tensor_augment import AugmentSettings, TensorAugment
from pfedmoap_cli.model.transforms import train_transform

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class PhotoSource(DatasetSource):
    """Deterministic smooth photographs of ``height`` x ``width``, one class per image, recording its decodes."""

    name = "photos"

    def __init__(self, count: int = 6, height: int = 300, width: int = 500) -> None:
        self.class_names = [f"class {i}" for i in range(count)]
        self.count, self.height, self.width = count, height, width
        self.loads: list[str] = []

    def _list_samples(self, split: str) -> list[Sample]:
        return [Sample(f"{split}/{i:03d}", i) for i in range(self.count)]

    def pixels(self, key: str) -> np.ndarray:
        rng = np.random.default_rng(int(key.split("/")[1]) + (1000 if key.startswith("test") else 0))
        coarse = rng.integers(0, 256, size=(self.height // 20, self.width // 20, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((self.width, self.height), Image.BILINEAR))

    def load_image(self, sample: Sample) -> Image.Image:
        self.loads.append(sample.key)
        return Image.fromarray(self.pixels(sample.key))


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def store_of(source: PhotoSource, cache: Path, memory_mb: int = 64, max_short_side: int | None = None) -> DecodedImageStore:
    return DecodedImageStore(source, source.samples("train"), cache, DecodedImageSettings(memory_mb, max_short_side))


def test_images_are_decoded_once_and_kept_in_memory(tmp_path):
    source = PhotoSource()
    store = store_of(source, tmp_path / "images")
    for _ in range(3):
        for index in range(source.count):
            assert torch.equal(store.image(index), chw(source.pixels(f"train/{index:03d}")))
    assert sorted(source.loads) == [f"train/{i:03d}" for i in range(source.count)]
    assert store.counts.memory_hits == 2 * source.count
    assert not (tmp_path / "images").exists()  # everything fitted: nothing written


def test_memory_cap_spills_least_recently_used_to_disk(tmp_path):
    source = PhotoSource()  # 300 x 500 x 3 = 450,000 bytes: two fit in 1 MiB, three do not
    store = store_of(source, tmp_path / "images", memory_mb=1)
    store.image(0), store.image(1), store.image(0), store.image(2)  # 1 is the least recently used
    assert store.counts.spilled == 1 and store.entry_path(1).is_file() and not store.entry_path(0).is_file()
    assert store.memory_bytes == 2 * 450_000 <= 2**20
    source.loads.clear()
    assert torch.equal(store.image(1), chw(source.pixels("train/001")))  # back from disk, not decoded
    assert source.loads == [] and store.counts.disk_reads == 1
    # another process (a new store) reads sound entries without decoding
    fresh = store_of(source, tmp_path / "images", memory_mb=0)
    assert torch.equal(fresh.image(1), chw(source.pixels("train/001")))
    assert source.loads == [] and fresh.counts.decoded == 0


def test_no_memory_keeps_everything_on_disk(tmp_path):
    source = PhotoSource(count=3)
    store = store_of(source, tmp_path / "images", memory_mb=0)
    for index in (0, 1, 2, 0, 1, 2):
        assert torch.equal(store.image(index), chw(source.pixels(f"train/{index:03d}")))
    assert store.memory_bytes == 0 and store.counts.decoded == 3 and store.counts.disk_reads == 3
    assert len(list((tmp_path / "images").rglob("*.safetensors"))) == 3


def test_damaged_disk_entry_is_decoded_again_with_a_notice(tmp_path, capsys):
    source = PhotoSource(count=2)
    store_of(source, tmp_path / "images", memory_mb=0).image(1)
    path = store_of(source, tmp_path / "images").entry_path(1)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the pixels: still a valid file
    path.write_bytes(bytes(data))
    source.loads.clear()
    store = store_of(source, tmp_path / "images")  # room in memory: the image would not spill again
    assert torch.equal(store.image(1), chw(source.pixels("train/001")))
    assert source.loads == ["train/001"] and store.counts.damaged == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "checksum" in lines[0]
    # the entry was rewritten: sound again for the next process
    again = store_of(source, tmp_path / "images", memory_mb=0)
    again.image(1)
    assert again.counts.disk_reads == 1 and again.counts.damaged == 0

    path.write_bytes(b"not a safetensors file")
    truncated = store_of(source, tmp_path / "images", memory_mb=0)
    assert torch.equal(truncated.image(1), chw(source.pixels("train/001")))
    assert truncated.counts.damaged == 1 and "unreadable" in capsys.readouterr().err


def test_large_images_are_stored_downscaled_to_the_cap(tmp_path):
    source = PhotoSource(count=1)
    image = store_of(source, tmp_path / "images", max_short_side=120).image(0)
    expected = Image.fromarray(source.pixels("train/000")).resize((200, 120), Image.BICUBIC)  # 500 * 120 / 300
    assert torch.equal(image, chw(np.asarray(expected)))
    portrait = PhotoSource(count=1, height=500, width=300)
    image = store_of(portrait, tmp_path / "portrait", max_short_side=120).image(0)
    assert torch.equal(image, chw(np.asarray(Image.fromarray(portrait.pixels("train/000")).resize((120, 200), Image.BICUBIC))))
    # at or under the cap: untouched; another cap is another disk entry
    assert store_of(source, tmp_path / "images", max_short_side=300).image(0).shape == (3, 300, 500)
    assert store_of(source, tmp_path, max_short_side=300).entry_key(0) != store_of(source, tmp_path, max_short_side=120).entry_key(0)


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_epochs_visit_samples_in_the_dataloader_order(tmp_path):
    """Two epochs: the tensor path's sample order is the PIL path's (a DataLoader) for the same shuffle generator."""
    source = PhotoSource(count=11, height=40, width=60)
    samples = source.samples("train")
    indices = [7, 2, 9, 0, 4, 10, 5, 1]
    labels = [samples[i].label for i in indices]  # each sample's own index: the labels spell the order
    store = store_of(source, tmp_path)
    tensor = decoded_epoch_batches(store, indices, labels, 3, seeded(4), seeded(5), torch.device("cpu"), TensorAugment(AugmentSettings(16, MEAN, STD)))
    pil = epoch_batches(ClientTrainImages(source, samples, indices, lambda image: torch.zeros(1)), 3, seeded(4), torch.device("cpu"))
    epochs = [[labels.tolist() for _, labels in tensor()] for _ in range(2)]
    assert epochs == [[labels.tolist() for _, labels in pil()] for _ in range(2)]
    assert epochs[0] != epochs[1] and [len(b) for b in epochs[0]] == [3, 3, 2]
    assert sorted(sum(epochs[0], [])) == sorted(indices)


def test_batches_equal_the_pil_path_for_the_same_seeds(tmp_path):
    """Same shuffle and augment seeds: same samples and labels, pixels within 2 grey levels of PIL's."""
    source = PhotoSource(count=7, height=90, width=120)
    samples = source.samples("train")
    indices = [6, 1, 3, 5, 0]
    labels = [samples[i].label for i in indices]
    store = store_of(source, tmp_path)
    tensor = decoded_epoch_batches(store, indices, labels, 2, seeded(8), seeded(9), torch.device("cpu"), TensorAugment(AugmentSettings(32, MEAN, STD)))
    pil = epoch_batches(ClientTrainImages(source, samples, indices, train_transform(32, MEAN, STD)), 2, seeded(8), torch.device("cpu"))
    torch.manual_seed(9)  # what Federation.client_job gives the PIL path
    pil_batches = list(pil()) + list(pil())
    tensor_batches = list(tensor()) + list(tensor())
    for (a, la), (b, lb) in zip(tensor_batches, pil_batches, strict=True):
        assert torch.equal(la, lb)
        assert ((a - b).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).max() <= 2.01


# ---- through the engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from pfedmoap_cli.artifacts.partition import load_partition, save_partition
    from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
    from pfedmoap_cli.data.sources import open_dataset
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.engine.session import open_session
    from pfedmoap_cli.engine.settings import TrainSettings
    from pfedmoap_cli.engine.workspace import RunPaths, Workspace

    workspace = Workspace(tmp_path_factory.mktemp("decoded"))
    source = open_dataset("synthetic", Path("unused"), train_per_class=2, test_per_class=1)
    partition = build_partition(source, PartitionSettings("dirichlet", 3, seed=2, alpha=0.5), {"train_per_class": 2, "test_per_class": 1})
    partition, sha = load_partition(save_partition(partition, workspace.partitions_dir)[0])
    settings = TrainSettings(method="promptfl", rounds=1, local_epochs=1, batch_size=8, n_ctx=2, backbone="tiny-vit", pretrained="none", device="cpu")
    session = open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False)
    return Federation(session, "decoded", RunPaths(workspace.run_dir("decoded")), progress=False)


def job_batches(federation, client_id: int, round_index: int, stream: str = "") -> list[tuple[torch.Tensor, torch.Tensor]]:
    state = federation.initial_state()
    return list(federation.client_job(client_id, round_index, state, None, stream=stream).batches())


def test_client_jobs_have_their_own_reproducible_streams(federation):
    assert federation.session.train_images is not None
    first = job_batches(federation, 1, 0)
    torch.manual_seed(999)  # nothing the global RNG does moves a job's batches
    torch.rand(5)
    again = job_batches(federation, 1, 0)
    assert len(first) == len(again) > 0
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(first, again))
    # another client, round or stream: other images or other crops
    for other in (job_batches(federation, 2, 0), job_batches(federation, 1, 1), job_batches(federation, 1, 0, "personalize")):
        assert not torch.equal(first[0][0], other[0][0])


@pytest.mark.parametrize("client_id,round_index,stream", [(0, 1, ""), (2, 0, "personalize")])
def test_job_batches_match_the_pil_job(federation, client_id, round_index, stream):
    """The engine seeds the tensor path like the PIL path: same labels in the same order, PIL-like pixels."""
    import dataclasses

    tensor = job_batches(federation, client_id, round_index, stream)
    pil_settings = dataclasses.replace(federation.settings, image_pipeline="pil")
    federation.settings, saved = pil_settings, federation.settings
    try:
        pil = job_batches(federation, client_id, round_index, stream)
    finally:
        federation.settings = saved
    for (a, la), (b, lb) in zip(tensor, pil, strict=True):
        assert torch.equal(la, lb)
        assert ((a - b).abs() * torch.tensor(federation.session.clip.std).view(1, 3, 1, 1) * 255).max() <= 2.01


# ---- the command line: both pipelines train and resume exactly --------------------------------

TRAIN = ("train", "--method", "promptfl", "--rounds", "2", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "8",
         "--backbone", "tiny-vit", "--pretrained", "none", "--device", "cpu")


def metrics_of(workspace: Path) -> tuple[str, str]:
    (path,) = (workspace / "runs").glob("*/metrics.csv")
    return path.parent.name, path.read_text()


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_both_pipelines_train_and_resume_exactly(cli, tmp_path, pipeline):
    partition = ("partition", "--dataset", "synthetic", "--clients", "3", "--dirichlet", "0.5", "--seed", "1",
                 "--option", "train_per_class=2", "--option", "test_per_class=1")
    for ws in ("whole", "resumed"):
        assert cli(*partition, workspace=tmp_path / ws).exit_code == 0
    args = (*TRAIN, "--image-pipeline", pipeline)
    whole = cli(*args, workspace=tmp_path / "whole")
    assert whole.exit_code == 0, whole.stderr
    # the resumed run keeps no decoded image in memory: every one comes back from the disk cache
    part = cli(*args, "--image-cache-mb", "0", "--stop-after", "1", workspace=tmp_path / "resumed")
    assert "1/2 rounds complete" in part.stdout, part.stderr
    resumed = cli(*args, "--image-cache-mb", "0", "--resume", workspace=tmp_path / "resumed")
    assert resumed.exit_code == 0, resumed.stderr
    assert metrics_of(tmp_path / "whole") == metrics_of(tmp_path / "resumed")
    frame = pd.read_csv(tmp_path / "whole" / "runs" / metrics_of(tmp_path / "whole")[0] / "metrics.csv")
    assert sorted(frame["round"].unique()) == [0, 1]
    spilled = list((tmp_path / "resumed" / "cache" / "images").rglob("*.safetensors"))
    assert (len(spilled) > 0) == (pipeline == "tensor")

"""Tests of the dataset sources and their registry, with tiny fake files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfedmoap_cli.data.sources import DatasetSource, Sample, dataset_names, open_dataset
from pfedmoap_cli.errors import ConfigError, DataError

SMALL_SYNTHETIC = dict(train_per_class=2, test_per_class=1)


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, 255 - value, 7)).save(path)


def _flat_tree(root: Path) -> None:
    for name, count in (("zebra", 6), ("apple", 5), ("mid_class", 3)):
        for i in range(count):
            _png(root / name / f"img{i:02d}.png", value=i * 10)


def _split_tree(root: Path) -> None:
    for name in ("b_cls", "a_cls", "c_cls"):
        _png(root / "train" / name / "x.png")
        _png(root / "train" / name / "y.jpg")
    _png(root / "test" / "a_cls" / "t.png")
    _png(root / "test" / "c_cls" / "t.bmp")  # b_cls has no test folder: fine


# ----------------------------------------------------------------------------- registry


def test_registry_lists_sources() -> None:
    assert {"imagefolder", "synthetic"} <= set(dataset_names())
    assert dataset_names() == sorted(dataset_names())


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ConfigError) as error:
        open_dataset("nope", Path("."))
    message = str(error.value)
    assert "unknown dataset 'nope'" in message
    assert all(name in message for name in dataset_names())


def _open_any(name: str, tmp_path: Path) -> DatasetSource:
    """Open every registered source on fake data (a new source must add its fake here)."""
    if name == "imagefolder":
        _flat_tree(tmp_path)
        return open_dataset(name, tmp_path)
    if name == "synthetic":
        return open_dataset(name, tmp_path, **SMALL_SYNTHETIC)
    from test_datasets_fakes import write_fake

    return open_dataset(name, tmp_path, **write_fake(name, tmp_path))


@pytest.mark.parametrize("name", dataset_names())
def test_every_source_honours_the_contract(name: str, tmp_path: Path) -> None:
    source = _open_any(name, tmp_path)
    assert source.name == name
    for split in ("train", "test"):
        samples = source.samples(split)
        assert samples and samples == source.samples(split)
        assert len({s.key for s in samples}) == len(samples)
        assert all(0 <= s.label < len(source.class_names) for s in samples)
        if source.domains is not None:
            assert all(s.domain in source.domains for s in samples)
        image = source.load_image(samples[0])
        assert image.mode == "RGB"
    assert len(source.fingerprint()) == 64
    with pytest.raises(ConfigError, match="split"):
        source.samples("val")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_world_shape() -> None:
    source = open_dataset("synthetic", Path("/nonexistent"))
    assert len(source.class_names) >= 30
    assert source.domains == ["photo", "sketch", "noisy"]
    train = source.samples("train")
    assert len(train) == 36 * 3 * 24 and len(source.samples("test")) == 36 * 3 * 12
    assert train[7] == Sample(key="train/photo/red_circle/0007", label=0, domain="photo")
    for s in train[:: 24 * 5]:
        slug = s.key.split("/")[2]
        assert slug == source.class_names[s.label].replace(" ", "_")
        assert s.key.split("/")[1] == s.domain
    # Ordered by domain, then class, then index.
    order = [(source.domains.index(s.domain), s.label, s.key) for s in train]
    assert order == sorted(order)


def test_synthetic_is_deterministic_and_seeded() -> None:
    a = open_dataset("synthetic", Path("."), **SMALL_SYNTHETIC)
    b = open_dataset("synthetic", Path("."), **SMALL_SYNTHETIC)
    c = open_dataset("synthetic", Path("."), seed=1, **SMALL_SYNTHETIC)
    samples = a.samples("test")
    picks = [samples[i] for i in (0, 40, 80)]  # one per domain
    for s in picks:
        first = np.asarray(a.load_image(s))
        assert first.shape == (32, 32, 3)
        assert np.array_equal(first, np.asarray(a.load_image(s)))
        assert np.array_equal(first, np.asarray(b.load_image(s)))
        assert not np.array_equal(first, np.asarray(c.load_image(s)))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # Different samples of one class differ.
    assert not np.array_equal(np.asarray(a.load_image(a.samples("train")[0])), np.asarray(a.load_image(a.samples("train")[1])))


def test_synthetic_image_size_and_bad_options() -> None:
    source = open_dataset("synthetic", Path("."), image_size=48, **SMALL_SYNTHETIC)
    assert source.load_image(source.samples("train")[0]).size == (48, 48)
    with pytest.raises(ConfigError, match="unknown synthetic option"):
        open_dataset("synthetic", Path("."), colour=3)
    with pytest.raises(ConfigError, match="seed"):
        open_dataset("synthetic", Path("."), seed=-1)


# ----------------------------------------------------------------------------- image folder


def test_image_folder_flat_layout(tmp_path: Path) -> None:
    _flat_tree(tmp_path)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    source = open_dataset("imagefolder", tmp_path)
    assert source.class_names == ["apple", "mid_class", "zebra"]
    assert source.domains is None
    train, test = source.samples("train"), source.samples("test")
    # Every 5th file (positions 4, 9, ...) of a class goes to test.
    assert [s.key for s in test] == ["apple/img04.png", "zebra/img04.png"]
    assert len(train) == 4 + 3 + 5
    assert train[0] == Sample(key="apple/img00.png", label=0)
    assert {s.label for s in train if s.key.startswith("zebra/")} == {2}
    pixels = np.asarray(source.load_image(train[1]))
    assert pixels.shape == (4, 4, 3) and tuple(pixels[0, 0]) == (10, 245, 7)


def test_image_folder_split_layout(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    source = open_dataset("imagefolder", tmp_path)
    assert source.class_names == ["a_cls", "b_cls", "c_cls"]
    assert [s.key for s in source.samples("train")][:2] == ["train/a_cls/x.png", "train/a_cls/y.jpg"]
    assert [(s.key, s.label) for s in source.samples("test")] == [("test/a_cls/t.png", 0), ("test/c_cls/t.bmp", 2)]
    fingerprint = source.fingerprint()
    assert open_dataset("imagefolder", tmp_path).fingerprint() == fingerprint
    _png(tmp_path / "train" / "b_cls" / "z.png")
    assert open_dataset("imagefolder", tmp_path).fingerprint() != fingerprint


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist; pass --data-root"):
        open_dataset("imagefolder", tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        open_dataset("imagefolder", tmp_path)
    _flat_tree(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class has no images"):
        open_dataset("imagefolder", tmp_path)


def test_image_folder_needs_some_test_images(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    for f in (tmp_path / "test").rglob("*.*"):
        f.unlink()
    with pytest.raises(DataError, match="no images"):
        open_dataset("imagefolder", tmp_path)
    flat = tmp_path / "flat"
    _png(flat / "one" / "a.png")
    with pytest.raises(DataError, match="no test images"):
        open_dataset("imagefolder", flat)


def test_image_folder_unreadable_image(tmp_path: Path) -> None:
    _flat_tree(tmp_path)
    source = open_dataset("imagefolder", tmp_path)
    (tmp_path / "apple" / "img00.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image"):
        source.load_image(source.samples("train")[0])

"""Fake files in every real dataset's on-disk layout, and the checks every source must pass.

The writers here are imported by the other ``test_datasets_*`` modules. Each
fake image is a small solid colour that ENCODES ITS LABEL (and its domain), so
a test can check after loading -- through a partition -- that every image
comes with its own label. Like timm's registry tests, the contract test loops
over the registry: a new dataset without a fake writer fails here.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfedmoap_cli.data.download import resources_of
from pfedmoap_cli.data.recipes_schema import check_recipe, check_sources
from pfedmoap_cli.data.sources import dataset_class, dataset_names, open_dataset
from pfedmoap_cli.data.sources.domainnet import CLASSES as DOMAINNET_CLASSES
from pfedmoap_cli.data.sources.domainnet import DOMAINS as DOMAINNET_DOMAINS
from pfedmoap_cli.data.sources.office_caltech10 import CLASSES as OFFICE_CLASSES
from pfedmoap_cli.data.sources.office_caltech10 import DOMAINS as OFFICE_DOMAINS
from pfedmoap_cli.recipes import load_recipe

# ----------------------------------------------------------------------------- label <-> pixel


def colour(label: int, domain_index: int = 0) -> tuple[int, int, int]:
    """A colour that survives JPEG: label in R and G (steps of 16), domain in B (steps of 32)."""
    return (16 * (label % 16) + 8, 16 * (label // 16) + 8, 32 * domain_index + 16)


def decode(image: Image.Image) -> tuple[int, int]:
    """(label, domain index) read back from an image written with :func:`colour`."""
    r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return r // 16 + 16 * (g // 16), b // 32


def write_image(path: Path, label: int, domain_index: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour(label, domain_index)).save(path, quality=95)


# ----------------------------------------------------------------------------- CoOp layouts

# Per dataset: (folder, image dir, split file, class count).
COOP = {
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
    "food101": ("food-101", "images", "split_zhou_Food101.json", 101),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", 47),
}
CALTECH_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def coop_classes(name: str) -> list[tuple[str, str]]:
    """(class name as in CoOp's split file, folder or file-name stem) in CoOp's label order."""
    count = COOP[name][3]
    if name == "caltech101":
        folders = sorted(["Faces", "Leopards", "Motorbikes", "airplanes"] + [f"object_{k:03d}" for k in range(count - 4)])
        return [(CALTECH_RENAMED.get(f, f), f) for f in folders]
    if name == "oxford_pets":  # capitalised breeds (cats) and lower-case ones (dogs), as in the real files
        breeds = [f"Breed_{k:02d}" if k % 3 == 0 else f"breed_{k:02d}" for k in range(count)]
        return [(b.lower(), b) for b in breeds]
    return [(f"{name}_class_{k:03d}", f"{name}_class_{k:03d}") for k in range(count)]


def coop_image_path(name: str, stem: str, label: int, index: int) -> str:
    """Path of one image relative to the image folder, in the dataset's real naming style."""
    if name == "flowers102":
        return f"image_{label * 10 + index + 1:05d}.jpg"
    if name == "oxford_pets":
        return f"{stem}_{index + 1}.jpg"
    if name == "dtd":
        return f"{stem}/{stem}_{index:04d}.jpg"
    if name == "caltech101":
        return f"{stem}/image_{index + 1:04d}.jpg"
    return f"{stem}/{1000 + index}.jpg"  # food101


def write_coop(root: Path, name: str, train: int = 2, val: int = 1, test: int = 1, split_file: bool = True, relabel=None) -> Path:
    """A CoOp-layout dataset with ``train``/``val``/``test`` images per class.

    ``relabel`` (a permutation of labels) makes the split file's labels differ
    from the folder order, to show labels come from the file. Images encode
    the label the split file gives them.
    """
    folder, image_dir, split_name, _ = COOP[name]
    base = root / folder
    lists: dict[str, list] = {"train": [], "val": [], "test": []}
    for k, (cname, stem) in enumerate(coop_classes(name)):
        label = relabel[k] if relabel is not None else k
        for i in range(train + val + test):
            rel = coop_image_path(name, stem, k, i)
            write_image(base / image_dir / rel, label)
            split = "train" if i < train else "val" if i < train + val else "test"
            lists[split].append([rel, label, cname])
    if name == "caltech101":  # folders CoOp leaves out
        for extra in ("BACKGROUND_Google", "Faces_easy"):
            write_image(base / image_dir / extra / "image_0001.jpg", 255)
    if name == "flowers102":
        (base / "cat_to_name.json").write_text(json.dumps({str(k + 1): c for k, (c, _) in enumerate(coop_classes(name))}))
    if split_file:
        rng = np.random.default_rng(0)
        for items in lists.values():  # the real files are not sorted by label either
            order = rng.permutation(len(items))
            items[:] = [items[i] for i in order]
        (base / split_name).write_text(json.dumps(lists))
    return base


# ----------------------------------------------------------------------------- FedBN layouts


def write_fedbn(root: Path, folder: str, domains, classes, train: int = 4, test: int = 2, as_arrays: bool = True) -> None:
    """FedBN's layout: ``<folder>/<domain>_<split>.pkl`` = (paths relative to root, text labels), shuffled."""
    rng = np.random.default_rng(1)
    for d, domain in enumerate(domains):
        for split, count in (("train", train), ("test", test)):
            paths, texts = [], []
            for k, cname in enumerate(classes):
                for i in range(count):
                    rel = f"{folder}/{domain}/{cname}/{domain}_{split}_{k:03d}_{i:04d}.jpg"
                    write_image(root / rel, k, d)
                    paths.append(rel)
                    texts.append(cname)
            order = rng.permutation(len(paths))  # so that list position and label are unrelated
            paths, texts = [paths[i] for i in order], [texts[i] for i in order]
            pair = (np.array(paths), np.array(texts)) if as_arrays else (paths, texts)
            with open(root / folder / f"{domain}_{split}.pkl", "wb") as handle:
                pickle.dump(pair, handle, pickle.HIGHEST_PROTOCOL)


def write_domainnet(root: Path, **kw) -> None:
    write_fedbn(root, "DomainNet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES, **kw)


def write_office(root: Path, **kw) -> None:
    write_fedbn(root, "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES, **kw)


FULL_CLASSES = ("aircraft_carrier", "bear", "The_Eiffel_Tower", "zigzag", "t-shirt")


def write_domainnet_full(root: Path, train: int = 2, test: int = 1) -> None:
    """Official DomainNet lists: ``DomainNet/<domain>_<split>.txt`` with ``<domain>/<class>/<file> <label>``."""
    for d, domain in enumerate(DOMAINNET_DOMAINS):
        for split, count in (("train", train), ("test", test)):
            lines = []
            for k, cname in enumerate(FULL_CLASSES):
                for i in range(count):
                    rel = f"{domain}/{cname}/{domain}_{k:03d}_{split}{i:03d}.jpg"
                    write_image(root / "DomainNet" / rel, k, d)
                    lines.append(f"{rel} {k}")
            (root / "DomainNet" / f"{domain}_{split}.txt").write_text("\n".join(lines[::-1]) + "\n")


# ----------------------------------------------------------------------------- CIFAR


def cifar_rows(labels: list[int]) -> np.ndarray:
    """N x 3072 uint8 rows (R, G, B planes) of solid images encoding ``labels``."""
    rows = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        rows[i] = np.asarray(colour(y), dtype=np.uint8)[:, None, None]
    return rows.reshape(len(labels), -1)


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 6) -> None:
    """torchvision's CIFAR folders with tiny pickled batches (protocol 2, like the originals)."""
    classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(2)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        files, key, meta = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", ("batches.meta", "label_names")
    else:
        base = root / "cifar-100-python"
        files, key, meta = ["train", "test"], "fine_labels", ("meta", "fine_label_names")
    base.mkdir(parents=True, exist_ok=True)
    for file in files:
        labels = [int(y) for y in rng.integers(0, classes, size=per_batch)]
        batch = {"batch_label": file, "data": cifar_rows(labels), key: labels, "filenames": [f"{i}.png" for i in range(per_batch)]}
        if name == "cifar100":
            batch["coarse_labels"] = [y // 5 for y in labels]
        with open(base / file, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    with open(base / meta[0], "wb") as handle:
        pickle.dump({meta[1]: [f"class_{k}" for k in range(classes)], "num_cases_per_batch": per_batch}, handle, protocol=2)


# ----------------------------------------------------------------------------- registry


def write_fake(name: str, root: Path) -> dict:
    """Write dataset ``name``'s fake under ``root``; return the options to open it with."""
    if name in COOP:
        write_coop(root, name)
    elif name == "domainnet":
        write_domainnet(root, train=1, test=1)
    elif name == "office_caltech10":
        write_office(root, train=1, test=1)
    elif name == "domainnet_full":
        write_domainnet_full(root)
    elif name in ("cifar10", "cifar100"):
        write_cifar(root, name)
    elif name == "imagefolder":
        for k in range(3):
            for i in range(5):
                write_image(root / f"class_{k}" / f"{i}.png", k)
    elif name == "synthetic":
        return {"train_per_class": 1, "test_per_class": 1}
    else:
        raise KeyError(name)
    return {}


def test_every_dataset_has_a_fake(tmp_path: Path) -> None:
    for name in dataset_names():
        write_fake(name, tmp_path / name)  # KeyError: add a writer for the new dataset above


REAL = [n for n in dataset_names() if resources_of(dataset_class(n))]


@pytest.mark.parametrize("name", REAL)
def test_contract_and_every_image_carries_its_label(name: str, tmp_path: Path) -> None:
    options = write_fake(name, tmp_path)
    source = open_dataset(name, tmp_path, **options)
    assert source.name == name
    for split in ("train", "test"):
        samples = source.samples(split)
        assert samples and len({s.key for s in samples}) == len(samples)
        assert all(0 <= s.label < len(source.class_names) for s in samples)
        for s in samples:
            label, domain_index = decode(source.load_image(s))
            assert label == s.label, (split, s)
            if source.domains is not None:
                assert source.domains[domain_index] == s.domain
    again = open_dataset(name, tmp_path, **options)
    assert again.fingerprint() == source.fingerprint() and len(source.fingerprint()) == 64


# ----------------------------------------------------------------------------- recipes


def _recipe(name: str) -> dict:
    recipe = load_recipe(name)
    assert recipe, f"data_recipes/{name}.toml is missing"
    return recipe


@pytest.mark.parametrize("name", REAL)
def test_recipe_is_well_formed_and_matches_the_code(name: str) -> None:
    from pfedmoap_cli.engine.settings import TrainSettings

    recipe = _recipe(name)
    assert check_recipe(name, recipe) == []
    assert check_sources(name, recipe, resources_of(dataset_class(name))) == []
    assert set(recipe["train"]) <= {f.name for f in fields(TrainSettings)}
    assert recipe["train"]["method"] == "pfedmoap" and recipe["train"]["pretrained"] == "openai"


@pytest.mark.parametrize("name", list(COOP))
def test_table1_recipes(name: str) -> None:
    recipe = _recipe(name)
    assert recipe["dataset"]["classes"] == COOP[name][3]
    assert {k: recipe["partition"][k] for k in ("scheme", "clients", "shots")} == {"scheme": "pathological", "clients": 10, "shots": 16}
    train = recipe["train"]
    assert (train["backbone"], train["rounds"], train["frac"], train["local_epochs"], train["batch_size"]) == ("RN50", 10, 1.0, 5, 16)
    assert train["method_options"] == {"num_experts": 9}


@pytest.mark.parametrize(("name", "clients", "rounds", "frac", "experts"), [("domainnet", 30, 25, 0.25, 19), ("office_caltech10", 20, 25, 0.5, 9)])
def test_domain_recipes(name: str, clients: int, rounds: int, frac: float, experts: int) -> None:
    recipe = _recipe(name)
    part, train = recipe["partition"], recipe["train"]
    assert (part["scheme"], part["alpha"], part["clients_per_domain"], part["min_size"]) == ("dirichlet", 0.3, 5, 2)
    assert part["clients_per_domain"] * len(recipe["dataset"]["domains"]) == part["clients"] == clients
    assert (train["backbone"], train["rounds"], train["frac"], train["batch_size"]) == ("ViT-B-16", rounds, frac, 32)
    assert train["method_options"] == {"num_experts": experts}
    assert recipe["dataset"]["domains"] == list(dataset_class(name).all_domains)
    assert recipe["dataset"]["class_names"] == list(dataset_class(name).classes)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_recipes(name: str) -> None:
    recipe = _recipe(name)
    part, train = recipe["partition"], recipe["train"]
    assert (part["scheme"], part["alpha"], part["clients"], part["min_size"]) == ("dirichlet", 0.5, 100, 10)
    assert (train["rounds"], train["frac"]) == (120, 0.1)

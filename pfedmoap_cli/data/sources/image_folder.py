"""User-supplied images in one folder per class (``"imagefolder"``).

Two layouts are accepted under the data root:

* ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (an explicit split), or
* ``<class>/*.jpg`` only; then every 5th file of a class (sorted by name,
  positions 4, 9, 14, ...) goes to test and the rest to train -- an 80/20
  split with no seed, so it never changes between machines or runs.

Class names are the sorted folder names of the training side; a test folder
for a class train lacks is an error, while a class without test images is
allowed (as long as some test image exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.data.sources.registry import register_dataset
from pfedmoap_cli.errors import ConfigError, DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
TEST_EVERY: int = 5  # in the flat layout, every 5th file of a class is a test image (80/20)


def _class_dirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (suffix case-insensitive)."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=lambda p: p.name,
    )


@register_dataset
class ImageFolderSource(DatasetSource):
    """A labelled image dataset read from one sub-folder per class.

    Parameters
    ----------
    root:
        Folder holding either ``train/`` and ``test/`` or the class folders directly.
    **options:
        None are accepted; any given is a configuration error.
    """

    name = "imagefolder"

    def __init__(self, root: Path, **options: Any) -> None:
        if options:
            raise ConfigError(
                f"dataset 'imagefolder' takes no options (got {', '.join(sorted(options))}); remove them"
            )
        self.root = Path(root)
        self.domains = None
        if not self.root.is_dir():
            raise DataError(
                f"data root {self.root} does not exist; pass --data-root pointing at a folder "
                "with one sub-folder per class"
            )
        self._splits = self._scan()
        self.class_names = list(self._class_names)

    def _scan(self) -> dict[str, list[Sample]]:
        """Walk the root once and build both splits, validating the layout."""
        train_dir, test_dir = self.root / "train", self.root / "test"
        if train_dir.is_dir() or test_dir.is_dir():
            if not (train_dir.is_dir() and test_dir.is_dir()):
                present, missing = ("train", "test") if train_dir.is_dir() else ("test", "train")
                raise DataError(
                    f"{self.root} has {present}/ but no {missing}/; add {missing}/<class>/ folders "
                    "or put the class folders directly under the data root"
                )
            return self._scan_split_layout(train_dir, test_dir)
        return self._scan_flat_layout()

    def _scan_split_layout(self, train_dir: Path, test_dir: Path) -> dict[str, list[Sample]]:
        train_classes = _class_dirs(train_dir)
        if not train_classes:
            raise DataError(f"{train_dir} has no class folders; add one sub-folder per class with its images")
        self._class_names = [d.name for d in train_classes]
        label_of = {name: i for i, name in enumerate(self._class_names)}
        extra = [d.name for d in _class_dirs(test_dir) if d.name not in label_of]
        if extra:
            raise DataError(
                f"{test_dir} has class folders that train/ lacks ({', '.join(extra)}); "
                "add them to train/ or remove them from test/"
            )
        train: list[Sample] = []
        for class_dir in train_classes:
            files = _images(class_dir)
            if not files:
                raise DataError(
                    f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "add images or remove the folder"
                )
            train.extend(self._sample(f, label_of[class_dir.name]) for f in files)
        test: list[Sample] = []
        for name in self._class_names:
            class_dir = test_dir / name
            if class_dir.is_dir():  # a class with no test folder simply has no test images
                test.extend(self._sample(f, label_of[name]) for f in _images(class_dir))
        if not test:
            raise DataError(f"{test_dir} has no images; add test/<class>/ images for at least one class")
        return {"train": train, "test": test}

    def _scan_flat_layout(self) -> dict[str, list[Sample]]:
        class_dirs = _class_dirs(self.root)
        if not class_dirs:
            raise DataError(
                f"data root {self.root} has no class folders; put one sub-folder of images per class in it"
            )
        self._class_names = [d.name for d in class_dirs]
        train: list[Sample] = []
        test: list[Sample] = []
        for label, class_dir in enumerate(class_dirs):
            files = _images(class_dir)
            if not files:
                raise DataError(
                    f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "add images or remove the folder"
                )
            for position, f in enumerate(files):
                is_test = position % TEST_EVERY == TEST_EVERY - 1
                (test if is_test else train).append(self._sample(f, label))
        if not test:
            raise DataError(
                f"data root {self.root} gives no test images (every {TEST_EVERY}th file of a class is one); "
                f"add at least {TEST_EVERY} images to some class or use the train/ test/ layout"
            )
        return {"train": train, "test": test}

    def _sample(self, path: Path, label: int) -> Sample:
        return Sample(key=path.relative_to(self.root).as_posix(), label=label)

    def _list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    def load_image(self, sample: Sample) -> Image.Image:
        """Open ``root / sample.key`` and convert it to RGB.

        Raises
        ------
        DataError
            If the file is missing or unreadable.
        """
        path = self.root / sample.key
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error}); restore or remove the file") from None

"""Frozen image features of test sets, computed once per backbone and cached on disk.

Test images go through a deterministic transform and a frozen encoder, so
their features are a pure function of (weights, image bytes, transform,
arithmetic). Every round of every run re-scores the same test sets, so
computing them once is exact and the largest single saving (PROTOCOL.md
section 1). The cache file is named by a content hash of everything the
features depend on; a mismatching or unreadable file is recomputed.

Each entry also records the sha256 of its tensor's bytes, checked on every
read: a flipped byte in the payload still parses as a valid float, and once
silently changed a table's accuracy (68.36% instead of 71.14%). A damaged
entry is recomputed and rewritten, with one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from pfedmoap_cli.artifacts.atomic import sha256_json
from pfedmoap_cli.artifacts.checked_tensor import read_checked_tensor, write_checked_tensor
from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.model.backbone import FrozenClip

CACHE_SCHEMA = "pfedmoap-image-features/1"
TENSOR_NAME = "features"

ImageLoader = Callable[[int], Image.Image]


def feature_cache_key(clip: FrozenClip, dataset_fingerprint: str, sample_keys: list[str], transform_id: str, tokens: bool = False) -> str:
    """Content hash naming the features of ``sample_keys`` under this backbone.

    Parameters
    ----------
    clip:
        The backbone (its weight identity and arithmetic enter the key: bf16 on
        CUDA gives other numbers than fp32).
    dataset_fingerprint:
        Hash of the dataset's files/sample list, supplied by the data layer.
    sample_keys:
        Stable ids of the images, in the order of the returned rows.
    transform_id:
        Description of the image transform (``clip.test_transform_id()``).
    tokens:
        Key the local-token tensors (N, 1 + M, D) instead of the pooled features.
    """
    payload = {
        "schema": CACHE_SCHEMA,
        "backbone": clip.spec.identity(),
        # Random-init weights depend on the library's initialisers; cheap insurance.
        "open_clip": import_open_clip().__version__,
        "dataset": dataset_fingerprint,
        "samples": sha256_json(list(sample_keys)),
        "transform": transform_id,
        "precision": clip.precision(),
    }
    if tokens:  # only added for tokens, so existing pooled-feature cache keys stay valid
        payload["kind"] = "local-tokens"
    return sha256_json(payload)


class _TransformedImages(torch.utils.data.Dataset):
    """Index -> transformed image tensor (a Dataset so DataLoader workers can decode in parallel)."""

    def __init__(self, load_image: ImageLoader, count: int, transform) -> None:
        self.load_image = load_image
        self.count = count
        self.transform = transform

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.load_image(index))


def compute_image_features(
    clip: FrozenClip,
    load_image: ImageLoader,
    count: int,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
    tokens: bool = False,
) -> torch.Tensor:
    """Normalised float32 features (count, D) of images 0..count-1, without any cache.

    With ``tokens`` the rows are the images' global and local tokens (count, 1 + M, D)
    from :func:`pfedmoap_cli.model.local_tokens.encode_image_tokens`.

    Parameters
    ----------
    clip:
        The frozen backbone; images go through ``clip.test_transform()``.
    load_image:
        ``load_image(i)`` returns image i as an RGB PIL image.
    count:
        Number of images.
    batch_size, num_workers:
        Encoder batch size; DataLoader worker processes for decoding (0: in this
        process; >0 needs a picklable ``load_image``).
    progress, desc:
        tqdm progress bar switch and label.
    """
    from tqdm.auto import tqdm

    dataset = _TransformedImages(load_image, count, clip.test_transform())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=clip.device.type == "cuda",
    )
    if tokens:
        from pfedmoap_cli.model.local_tokens import encode_image_tokens, num_local_tokens

        encode, shape = (lambda x: encode_image_tokens(clip, x)), (count, 1 + num_local_tokens(clip), clip.embed_dim)
    else:
        encode, shape = clip.encode_images, (count, clip.embed_dim)
    features = torch.empty(shape, dtype=torch.float32)
    row = 0
    with tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images in loader:
            batch = encode(images).cpu()
            features[row : row + batch.shape[0]] = batch
            row += batch.shape[0]
            bar.update(batch.shape[0])
    return features


def cached_image_features(
    clip: FrozenClip,
    load_image: ImageLoader,
    sample_keys: list[str],
    dataset_fingerprint: str,
    cache_dir: Path,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
    tokens: bool = False,
) -> torch.Tensor:
    """Features (N, D) of the N images named by ``sample_keys``, from the cache when possible.

    With ``tokens``: their global and local tokens (N, 1 + M, D), cached under another key.

    Parameters
    ----------
    clip:
        The frozen backbone.
    load_image:
        ``load_image(i)`` returns the RGB PIL image of ``sample_keys[i]``; not
        called at all on a cache hit.
    sample_keys:
        Stable ids of the images; row i of the result belongs to ``sample_keys[i]``.
    dataset_fingerprint:
        Hash identifying the dataset's contents.
    cache_dir:
        Directory of the cache (e.g. ``<workspace>/cache/features``); the file is
        ``<cache_dir>/<key>.safetensors``.
    batch_size, num_workers, progress, desc:
        As in :func:`compute_image_features`.

    Returns
    -------
    Tensor
        float32, L2-normalised, on the CPU.
    """
    key = feature_cache_key(clip, dataset_fingerprint, sample_keys, clip.test_transform_id(), tokens=tokens)
    path = Path(cache_dir) / f"{key}.safetensors"
    if tokens:
        from pfedmoap_cli.model.local_tokens import num_local_tokens

        shape = (len(sample_keys), 1 + num_local_tokens(clip), clip.embed_dim)
    else:
        shape = (len(sample_keys), clip.embed_dim)
    problem = None
    if path.is_file():
        cached, problem = read_checked_tensor(
            path, TENSOR_NAME, key, lambda t: tuple(t.shape) == shape and t.dtype == torch.float32, "these features"
        )
        if cached is not None:
            return cached
    features = compute_image_features(
        clip, load_image, len(sample_keys), batch_size=batch_size, num_workers=num_workers, progress=progress, desc=desc, tokens=tokens
    )
    metadata = {
        "key": key,
        "backbone": clip.spec.identity(),
        "num": str(len(sample_keys)),
        "schema": CACHE_SCHEMA,
    }
    write_checked_tensor(path, TENSOR_NAME, features, metadata)
    if problem is not None:
        print(f"feature cache entry {path} {problem}; recomputed", file=sys.stderr, flush=True)
    return features

"""Test-feature cache: hits skip the image loader, any changed input recomputes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pfedmoap_cli.model.backbone import BackboneSpec, FrozenClip, load_backbone
from pfedmoap_cli.model.features import cached_image_features, compute_image_features, feature_cache_key

COUNT = 7


class CountingLoader:
    """Deterministic coloured images that count how often they are asked for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, index: int) -> Image.Image:
        self.calls += 1
        return Image.new("RGB", (40 + index, 36), ((37 * index) % 256, (91 * index) % 256, 120))


@pytest.fixture(scope="module")
def clip() -> FrozenClip:
    return load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))


def _keys(prefix: str = "img") -> list[str]:
    return [f"{prefix}/{i:03d}.jpg" for i in range(COUNT)]


def _features(clip: FrozenClip, loader, cache: Path, keys=None) -> torch.Tensor:
    return cached_image_features(
        clip, loader, keys or _keys(), "dataset-fp", cache, batch_size=3, progress=False
    )


def test_hit_returns_same_tensor_without_loading(clip, tmp_path):
    loader = CountingLoader()
    first = _features(clip, loader, tmp_path)
    assert loader.calls == COUNT and first.shape == (COUNT, clip.embed_dim)
    assert torch.allclose(first.norm(dim=-1), torch.ones(COUNT), atol=1e-5)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = _features(clip, loader, tmp_path)
    assert loader.calls == COUNT
    assert torch.equal(first, again)


def test_matches_uncached_computation(clip, tmp_path):
    cached = _features(clip, CountingLoader(), tmp_path)
    direct = compute_image_features(clip, CountingLoader(), COUNT, batch_size=5, progress=False)
    assert torch.allclose(cached, direct, atol=1e-6)


def test_changed_inputs_recompute(clip, tmp_path):
    loader = CountingLoader()
    _features(clip, loader, tmp_path)
    _features(clip, loader, tmp_path, keys=_keys("other"))
    assert loader.calls == 2 * COUNT
    other_seed = load_backbone(BackboneSpec("tiny-vit", None, init_seed=1))
    changed = _features(other_seed, loader, tmp_path)
    assert loader.calls == 3 * COUNT
    assert not torch.allclose(changed, _features(clip, loader, tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    keys = {
        feature_cache_key(c, fp, _keys(), c.test_transform_id())
        for c in (clip, other_seed)
        for fp in ("dataset-fp", "dataset-fp2")
    }
    assert len(keys) == 4


def test_corrupt_cache_file_is_recomputed(clip, tmp_path):
    loader = CountingLoader()
    first = _features(clip, loader, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"garbage" * 10)
    second = _features(clip, loader, tmp_path)
    assert loader.calls == 2 * COUNT and torch.equal(first, second)
    assert torch.equal(_features(clip, loader, tmp_path), first) and loader.calls == 2 * COUNT


def test_wrong_shape_in_cache_is_recomputed(clip, tmp_path):
    from safetensors.torch import save_file

    loader = CountingLoader()
    first = _features(clip, loader, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    key = path.stem
    save_file({"features": torch.zeros(COUNT - 1, clip.embed_dim)}, str(path), metadata={"key": key})
    assert torch.equal(_features(clip, loader, tmp_path), first) and loader.calls == 2 * COUNT

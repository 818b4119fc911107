"""Cache entries carry a checksum of their features: damaged payload bytes are recomputed, never used."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from PIL import Image

from pfedmoap_cli.model.backbone import BackboneSpec, FrozenClip, load_backbone
from pfedmoap_cli.model.features import cached_image_features, compute_image_features

COUNT = 5


def _image(index: int) -> Image.Image:
    return Image.new("RGB", (40 + index, 36), ((53 * index) % 256, (17 * index) % 256, 200))


@pytest.fixture(scope="module")
def clip() -> FrozenClip:
    return load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))


def _cached(clip, cache, tokens=False):
    return cached_image_features(clip, _image, [f"k{i}" for i in range(COUNT)], "fp", cache, batch_size=2, progress=False, tokens=tokens)


def _payload_offset(path) -> int:
    """Where the tensor bytes of a safetensors file begin (8-byte header length, JSON header, data)."""
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + length


def _header(path) -> dict:
    return json.loads(path.read_bytes()[8:_payload_offset(path)])


@pytest.mark.parametrize("tokens", [False, True])
def test_flipped_payload_bytes_are_recomputed_and_rewritten(clip, tmp_path, capsys, tokens):
    first = _cached(clip, tmp_path, tokens)
    (path,) = tmp_path.glob("*.safetensors")
    assert len(_header(path)["__metadata__"]["sha256"]) == 64
    data = bytearray(path.read_bytes())
    at = _payload_offset(path) + 4 * 3 + 1
    data[at] ^= 0x10  # still a valid float: nothing but the checksum can tell
    path.write_bytes(bytes(data))
    capsys.readouterr()

    again = _cached(clip, tmp_path, tokens)
    assert capsys.readouterr().err.strip() == f"feature cache entry {path} was damaged (checksum mismatch); recomputed"
    fresh = compute_image_features(clip, _image, COUNT, batch_size=3, progress=False, tokens=tokens)  # independent
    assert torch.allclose(again, fresh, atol=1e-6) and torch.equal(again, first)
    assert path.read_bytes() != bytes(data)  # rewritten ...
    assert torch.equal(_cached(clip, tmp_path, tokens), first) and capsys.readouterr().err == ""  # ... and sound again


def test_unreadable_entry_is_recomputed_with_a_message(clip, tmp_path, capsys):
    first = _cached(clip, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    capsys.readouterr()
    assert torch.equal(_cached(clip, tmp_path), first)
    assert capsys.readouterr().err.strip() == f"feature cache entry {path} was damaged (unreadable); recomputed"


def test_entry_without_a_checksum_is_recomputed(clip, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = _cached(clip, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "sha256"}
    save_file({"features": torch.zeros_like(first)}, str(path), metadata=metadata)  # an older version's entry, wrong numbers
    capsys.readouterr()
    assert torch.equal(_cached(clip, tmp_path), first)
    assert "has no checksum" in capsys.readouterr().err

"""OpenAI-format CLIP state dicts without the TorchScript entries load with --pretrained PATH.

``torch.save(model.state_dict())`` from OpenAI's ``clip`` package holds only
tensors, in OpenAI's key layout, and none of the ``input_resolution``,
``context_length`` and ``vocab_size`` entries of its TorchScript archives.
The files here are built the way OpenAI's loader builds its models (open_clip's
``build_model_from_openai_state_dict``: QuickGELU, fp16 weights as
``convert_weights`` leaves them), saved with the three entries left out, and
the tensors that come back are compared with the ones saved.
"""

from __future__ import annotations

import pytest
import torch

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ArtifactError
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone, register_tiny_configs
from pfedmoap_cli.model.checkpoints import OPENAI_INT_KEYS, clip_layout

TOWERS = {"tiny-vit": "VisionTransformer", "tiny-rn": "ModifiedResNet"}


def _openai_state_dict(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """An OpenAI-layout state dict of ``arch``'s shapes, as OpenAI's ``clip.load`` model would give it."""
    open_clip = import_open_clip()
    register_tiny_configs()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        source = open_clip.create_model(arch, force_quick_gelu=True)
        # Distinct values everywhere (batch-norm statistics included), so a missed tensor shows.
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)
    # Round trip through OpenAI's builder: OpenAI's layout and its fp16 conversion of the weights.
    model = open_clip.model.build_model_from_openai_state_dict(dict(source.state_dict()), quick_gelu=True)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert not any(key in state for key in OPENAI_INT_KEYS)
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float16, torch.float32}
    return state


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def _assert_same_tensors(loaded: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert set(got) == set(saved)
    for key, value in saved.items():
        assert got[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        assert torch.equal(got[key], value.to(got[key].dtype)), key


@pytest.mark.parametrize("arch", sorted(TOWERS))
def test_loads_under_the_matching_backbone(arch, tmp_path):
    saved = _openai_state_dict(arch, seed=11)
    path = _save(saved, tmp_path / f"{arch}-openai.pt")
    loaded = load_backbone(BackboneSpec(arch, path))
    assert type(loaded.clip.visual).__name__ == TOWERS[arch]
    _assert_same_tensors(loaded.clip, saved)


@pytest.mark.parametrize("arch", sorted(TOWERS))
def test_a_label_builds_the_architecture_from_the_shapes(arch, tmp_path):
    """A --backbone name open_clip does not know: the file's shapes decide, with OpenAI's QuickGELU."""
    saved = _openai_state_dict(arch, seed=12)
    path = _save(saved, tmp_path / "openai-clip.pt")
    loaded = load_backbone(BackboneSpec("my-openai-clip", path))
    assert type(loaded.clip.visual).__name__ == TOWERS[arch]
    _assert_same_tensors(loaded.clip, saved)
    activations = {type(module).__name__ for module in loaded.clip.transformer.modules()}
    assert "QuickGELU" in activations and "GELU" not in activations
    assert loaded.image_size == 32 and loaded.embed_dim == 32 and loaded.context_length == 77
    assert loaded.spec.identity().startswith("my-openai-clip|sha256:")


@pytest.mark.parametrize(("arch", "wrong"), [("tiny-vit", "tiny-rn"), ("tiny-rn", "ViT-B-16")])
def test_a_wrong_backbone_names_the_matching_one(arch, wrong, tmp_path):
    path = _save(_openai_state_dict(arch, seed=13), tmp_path / "openai.pt")
    with pytest.raises(ArtifactError) as caught:
        load_backbone(BackboneSpec(wrong, path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"does not match --backbone {wrong}" in message
    assert f"pass --backbone {arch}" in message
    assert ("ViT width 64, 2 layers, patch 8, 32 px" if arch == "tiny-vit" else "ModifiedResNet layers (1, 1, 1, 1)") in message


def test_the_layout_is_read_from_the_keys():
    vit, rn = _openai_state_dict("tiny-vit", seed=1), _openai_state_dict("tiny-rn", seed=1)
    assert (clip_layout(vit), clip_layout(rn)) == ("vit", "resnet")
    assert clip_layout({key: value for key, value in vit.items() if key != "token_embedding.weight"}) is None
    assert clip_layout({key: value for key, value in vit.items() if not key.startswith("visual.")}) is None
    assert clip_layout({"weight": torch.zeros(2), "bias": torch.zeros(2)}) is None

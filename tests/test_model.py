"""Model layer: tiny backbones, CoOp prompt text encoder, local checkpoints, devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ArtifactError, ConfigError, UserError
from pfedmoap_cli.model.backbone import BackboneSpec, FrozenClip, load_backbone, resolve_device
from pfedmoap_cli.model.prompt import PromptTextEncoder, encode_texts

TOWERS = ["tiny-vit", "tiny-rn"]
CLASSES = ["red_circle", "blue square", "a much longer class name here", "x"]


@pytest.fixture(scope="module")
def backbones() -> dict[str, FrozenClip]:
    return {name: load_backbone(BackboneSpec(name, None, init_seed=0)) for name in TOWERS}


def _images(clip: FrozenClip, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))


# -- building ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOWERS)
def test_tiny_backbone_builds_frozen(backbones, name):
    clip = backbones[name]
    assert not any(p.requires_grad for p in clip.parameters())
    assert not clip.clip.logit_scale.requires_grad
    assert not clip.clip.training
    clip.train()  # a parent switching to training must not unfreeze batch-norm statistics
    assert not clip.clip.training
    assert (clip.embed_dim, clip.text_width, clip.image_size, clip.context_length) == (32, 64, 32, 77)
    assert isinstance(clip.logit_scale, float) and clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    features = clip.encode_images(_images(clip))
    assert features.shape == (3, 32) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert clip.tokenize(["a photo"]).shape == (1, 77)


def test_visual_tower_types(backbones):
    open_clip = import_open_clip()
    assert isinstance(backbones["tiny-rn"].clip.visual, open_clip.modified_resnet.ModifiedResNet)
    assert isinstance(backbones["tiny-vit"].clip.visual, open_clip.transformer.VisionTransformer)


def test_random_init_is_seeded_and_leaves_global_rng_alone(backbones):
    state = torch.random.get_rng_state()
    same = load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))
    other = load_backbone(BackboneSpec("tiny-vit", None, init_seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    reference = backbones["tiny-vit"].clip.state_dict()
    assert all(torch.equal(value, same.clip.state_dict()[key]) for key, value in reference.items())
    assert not torch.equal(reference["visual.conv1.weight"], other.clip.state_dict()["visual.conv1.weight"])
    assert same.spec.identity() == "tiny-vit|random:0" != other.spec.identity()


def test_unknown_model_and_tag_are_config_errors():
    with pytest.raises(ConfigError, match="list_models"):
        load_backbone(BackboneSpec("no-such-model", None))
    with pytest.raises(ConfigError, match="unknown pretrained tag"):
        load_backbone(BackboneSpec("tiny-vit", "no_such_tag"))


def test_unreachable_pretrained_tag_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    # The weights are looked up in the (here empty) cache, then asked of the Hub once (model/hub.py).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", offline)
    with pytest.raises(UserError, match=r"could not fetch pretrained weights RN50/openai \(offline\?\)"):
        load_backbone(BackboneSpec("RN50", "openai"))


# -- prompt text encoder ----------------------------------------------------------------
@pytest.mark.parametrize("name", TOWERS)
def test_truncation_is_exact_single_and_batched(backbones, name):
    clip = backbones[name]
    short = PromptTextEncoder(clip, CLASSES, n_ctx=4, truncate=True)
    full = PromptTextEncoder(clip, CLASSES, n_ctx=4, truncate=False)
    assert short.used_length < clip.context_length
    generator = torch.Generator().manual_seed(0)
    ctx = short.initial_context(generator)
    assert ctx.shape == (4, 64) and ctx.dtype == torch.float32
    assert torch.allclose(short(ctx), full(ctx), atol=1e-5)
    batch = torch.stack([short.initial_context(generator) for _ in range(3)])
    out = short(batch)
    assert out.shape == (3, len(CLASSES), 32)
    assert torch.allclose(out, full(batch), atol=1e-5)
    for p in range(3):
        assert torch.allclose(out[p], full(batch[p]), atol=1e-5)


def test_gradient_reaches_only_ctx(backbones):
    clip = backbones["tiny-vit"]
    encoder = PromptTextEncoder(clip, CLASSES, n_ctx=4)
    assert list(encoder.parameters()) == [] and len(encoder.state_dict()) == 0
    ctx = encoder.initial_context(torch.Generator().manual_seed(0)).requires_grad_(True)
    image = clip.encode_images(_images(clip, 2))
    logits = clip.logit_scale * image @ encoder(ctx).t()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


@pytest.mark.parametrize("truncate", [False, True])
def test_placeholder_context_matches_encode_text(backbones, truncate):
    clip = backbones["tiny-rn"]
    encoder = PromptTextEncoder(clip, CLASSES, n_ctx=3, truncate=truncate)
    assert encoder.texts[0] == "X X X red circle."
    x_embeddings = encoder.embedding[0, 1:4].clone()
    with torch.no_grad():
        expected = clip.clip.encode_text(clip.tokenize(encoder.texts), normalize=True)
    assert torch.allclose(encoder(x_embeddings), expected, atol=1e-5)
    assert torch.allclose(encode_texts(clip, encoder.texts), expected, atol=1e-6)


def test_init_phrase_sets_context(backbones):
    clip = backbones["tiny-vit"]
    encoder = PromptTextEncoder(clip, CLASSES, n_ctx=16, init_phrase="a photo of a")
    assert encoder.n_ctx == 4
    ctx = encoder.initial_context(torch.Generator().manual_seed(0))
    phrase_ids = clip.tokenize(["a photo of a"])[0, 1:5]
    assert torch.equal(ctx, clip.clip.token_embedding.weight[phrase_ids])
    zero_shot = encode_texts(clip, [f"a photo of a {name.replace('_', ' ')}." for name in CLASSES])
    assert torch.allclose(encoder(ctx), zero_shot, atol=1e-5)


def test_too_long_prompt_is_a_config_error(backbones):
    clip = backbones["tiny-vit"]
    with pytest.raises(ConfigError, match="smaller --n-ctx"):
        PromptTextEncoder(clip, ["cat", "word " * 60], n_ctx=16)
    with pytest.raises(ConfigError, match="needs 78 tokens"):
        PromptTextEncoder(clip, ["cat"], n_ctx=74)  # SOT + 74 + cat + . + EOT = 78
    PromptTextEncoder(clip, ["cat"], n_ctx=73)  # exactly 77 fits


# -- local checkpoints ------------------------------------------------------------------
def _same_features(a: FrozenClip, b: FrozenClip) -> bool:
    images = _images(a)
    tokens = a.tokenize(["a photo of a red circle.", "blue"])
    with torch.no_grad():
        text_a, text_b = a.clip.encode_text(tokens), b.clip.encode_text(tokens)
    return torch.equal(a.encode_images(images), b.encode_images(images)) and torch.equal(text_a, text_b)


def test_open_clip_state_dict_checkpoints(backbones, tmp_path):
    from safetensors.torch import save_file

    source = load_backbone(BackboneSpec("tiny-rn", None, init_seed=5))
    state = source.clip.state_dict()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    for path in (wrapped, plain):
        loaded = load_backbone(BackboneSpec("tiny-rn", str(path)))
        assert _same_features(source, loaded)
        assert loaded.spec.identity().startswith("tiny-rn|sha256:")
    assert not _same_features(source, backbones["tiny-rn"])
    with pytest.raises(ArtifactError, match="does not match --backbone tiny-vit; pass --backbone tiny-rn"):
        load_backbone(BackboneSpec("tiny-vit", str(wrapped)))


def test_openai_format_state_dict(tmp_path):
    open_clip = import_open_clip()
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = open_clip.create_model("tiny-vit", force_quick_gelu=True).eval()  # OpenAI CLIPs use QuickGELU
    state = dict(reference.state_dict())
    state.update(input_resolution=32, context_length=77, vocab_size=49408)
    path = tmp_path / "openai-tiny.pt"
    torch.save(state, path)
    loaded = load_backbone(BackboneSpec("my-label", str(path)))  # the name is only a label here
    assert type(loaded.clip.visual).__name__ == "VisionTransformer"
    assert all(p.dtype == torch.float32 for p in loaded.clip.parameters())
    expected = FrozenClip(reference, BackboneSpec("tiny-vit", None), open_clip.get_tokenizer("tiny-vit"))
    assert _same_features(expected, loaded)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive(tmp_path):
    open_clip = import_open_clip()
    with torch.random.fork_rng():
        torch.manual_seed(8)
        reference = open_clip.create_model("tiny-vit", force_quick_gelu=True).eval()
    archive = torch.jit.trace_module(reference, {"encode_image": (torch.ones(2, 3, 32, 32),)})
    path = tmp_path / "openai-tiny-jit.pt"
    torch.jit.save(archive, str(path))
    loaded = load_backbone(BackboneSpec("ViT-tiny-openai", str(path)))
    expected = FrozenClip(reference, BackboneSpec("tiny-vit", None), open_clip.get_tokenizer("tiny-vit"))
    assert _same_features(expected, loaded)


def test_missing_checkpoint_path_is_an_artifact_error(tmp_path):
    for value in (str(tmp_path / "nope.pt"), "weights/clip.bin", "model.safetensors"):
        with pytest.raises(ArtifactError, match="does not exist"):
            load_backbone(BackboneSpec("tiny-vit", value))


def test_corrupt_checkpoint_is_an_artifact_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="cannot read checkpoint"):
        load_backbone(BackboneSpec("tiny-vit", str(path)))


# -- transforms and devices -------------------------------------------------------------
def test_transforms(backbones):
    clip = backbones["tiny-vit"]
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    assert clip.test_transform()(image).shape == (3, 32, 32)
    assert clip.train_transform()(image).shape == (3, 32, 32)
    assert clip.test_transform()(image.convert("L")).shape == (3, 32, 32)
    assert clip.test_transform_id() == backbones["tiny-rn"].test_transform_id()
    assert "bicubic" in clip.test_transform_id()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown --device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda")

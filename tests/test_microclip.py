"""The micro-CLIP: its architecture, its shipped weights, and the script that regenerates them."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.data.sources import synthetic
from pfedmoap_cli.errors import ArtifactError
from pfedmoap_cli.model import pretrained
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone, register_tiny_configs
from pfedmoap_cli.model.prompt import PromptTextEncoder

REPO = Path(__file__).resolve().parent.parent
ENTRY = pretrained.get_pretrained("micro-clip", "synthetic")


@functools.cache
def _script():
    """scripts/pretrain_microclip.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("pretrain_microclip", REPO / "scripts" / "pretrain_microclip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micro_clip():
    return load_backbone(BackboneSpec("micro-clip", "synthetic"))


# ----------------------------------------------------------------------------- architecture


def test_config_keeps_what_prompt_learning_needs():
    cfg = json.loads((REPO / "pfedmoap_cli" / "model" / "configs" / "micro-clip.json").read_text())
    # EOT pooling takes the argmax token id: the vocabulary must be CLIP's, and
    # 1 + 16 context tokens + the longest class name + "." + EOT must fit.
    assert cfg["text_cfg"]["vocab_size"] == 49408
    assert cfg["text_cfg"]["context_length"] == 77
    assert cfg["text_cfg"]["width"] <= 64


def test_sixteen_token_context_fits_every_class(micro_clip):
    encoder = PromptTextEncoder(micro_clip, synthetic.class_names(), n_ctx=16)
    assert encoder.used_length <= micro_clip.context_length
    assert encoder(encoder.initial_context()).shape == (36, micro_clip.embed_dim)


def test_truncated_text_encoder_is_exact():
    script = _script()
    open_clip = import_open_clip()
    register_tiny_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("micro-clip").eval()
    tokens = open_clip.get_tokenizer("micro-clip")(["a sketch of a red circle.", "blue star.", "a grainy picture of a green ring."])
    with torch.no_grad():
        full = model.encode_text(tokens)
        cut = script.encode_text_truncated(model, tokens)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- shipped weights


def test_weights_file_is_small_and_matches_its_records():
    path = pretrained.weights_path(ENTRY)  # also checks the registry's sha256
    assert path.stat().st_size <= 10 * 1024 * 1024
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (path.parent / "micro-clip-synthetic.sha256").read_text().split()[0] == digest == ENTRY.sha256
    summary = json.loads((path.parent / "micro-clip-synthetic.json").read_text())
    assert summary["sha256"] == digest
    assert summary["command"].startswith("OMP_NUM_THREADS=1 python scripts/pretrain_microclip.py")
    assert summary["zero_shot_test"]["overall"] > 0.5


def test_loads_offline_by_name(micro_clip):
    assert micro_clip.spec.identity() == f"micro-clip|synthetic|sha256:{ENTRY.sha256}"
    stored = pretrained.load_pretrained_state(ENTRY)
    state = micro_clip.clip.state_dict()
    assert set(stored) == set(state)
    for key, value in stored.items():
        assert value.dtype == torch.float32
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in micro_clip.parameters())
    assert 1.0 < micro_clip.logit_scale <= 100.0


def test_altered_weights_are_refused_with_the_fix(tmp_path, monkeypatch):
    source = pretrained.WEIGHTS_DIR / ENTRY.filename
    copy = tmp_path / ENTRY.filename
    shutil.copyfile(source, copy)
    with open(copy, "r+b") as handle:  # flip one byte in the tensor data
        handle.seek(-5, 2)
        byte = handle.read(1)
        handle.seek(-5, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path)
    with pytest.raises(ArtifactError, match="sha256.*regenerate it with: OMP_NUM_THREADS=1 python scripts/pretrain_microclip.py"):
        load_backbone(BackboneSpec("micro-clip", "synthetic"))
    copy.unlink()
    with pytest.raises(ArtifactError, match="missing; reinstall pfedmoap"):
        load_backbone(BackboneSpec("micro-clip", "synthetic"))


def test_unknown_tag_is_not_taken_for_the_shipped_weights():
    assert pretrained.get_pretrained("micro-clip", None) is None
    assert pretrained.get_pretrained("tiny-vit", "synthetic") is None
    assert ("micro-clip", "synthetic") in pretrained.list_pretrained()


# ----------------------------------------------------------------------------- pretraining


def test_pretraining_images_are_not_dataset_images():
    source = synthetic.SyntheticSource(test_per_class=4, train_per_class=4)
    dataset = {hashlib.sha256(np.asarray(source.load_image(s)).tobytes()).hexdigest() for split in ("train", "test") for s in source.samples(split)}
    pretraining = {
        hashlib.sha256(synthetic.pretraining_image(0, domain, label, index).tobytes()).hexdigest()
        for domain in synthetic.DOMAINS
        for label in range(36)
        for index in range(4)
    }
    assert len(pretraining) == 3 * 36 * 4
    assert not dataset & pretraining
    # deterministic, and the same renderer as the dataset (same size and type)
    again = synthetic.pretraining_image(0, "sketch", 5, 1)
    assert np.array_equal(again, synthetic.pretraining_image(0, "sketch", 5, 1))
    assert again.shape == (32, 32, 3) and again.dtype == np.uint8


def test_pretraining_is_deterministic(tmp_path):
    """Two short runs of the real script give byte-identical weights."""
    script = _script()
    args = ["--steps", "3", "--batch-size", "16", "--pool-per-class", "1", "--warmup-steps", "1",
            "--eval-every", "0", "--eval-per-class", "1"]
    first = script.main([*args, "--out", str(tmp_path / "a")])
    second = script.main([*args, "--out", str(tmp_path / "b")])
    assert first == second
    name = "micro-clip-synthetic.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    summary = json.loads((tmp_path / "a" / "micro-clip-synthetic.json").read_text())
    assert summary["config"]["steps"] == 3 and len(summary["history"]) == 1
    assert summary["command"].endswith("--eval-per-class 1 --out " + str(tmp_path / "a"))


def test_misspelt_tag_names_the_shipped_tag():
    from pfedmoap_cli.errors import ConfigError
    from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone

    with pytest.raises(ConfigError, match=r"unknown pretrained tag 'synthetc' for micro-clip \(known: synthetic\)"):
        load_backbone(BackboneSpec("micro-clip", "synthetc"))

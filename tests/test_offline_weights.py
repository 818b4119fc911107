"""Pretrained tags offline: cache first, HF_HUB_OFFLINE honoured, no minute of Hub retries.

No test here reaches the network: name resolution is made to fail in-process
(``socket.getaddrinfo``), and the subprocesses run with ``HF_HUB_OFFLINE=1``
and an ``HF_ENDPOINT`` on a closed local port, so a CI machine with internet
downloads nothing either.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pfedmoap_cli.errors import UserError
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone

SCRIPT = Path(sys.executable).with_name("pfedmoap")
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens there
_HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
            "PFEDMOAP_DEBUG", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _HUB_ENV}
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": CLOSED_ENDPOINT, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this process, and lookups of any host name that fail (as offline)."""
    from huggingface_hub import constants

    for name in _HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lookups: list[str] = []

    def no_dns(host, *args, **kwargs):
        lookups.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return lookups


def test_offline_mode_fails_at_once_without_touching_the_network(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read now, not only when huggingface_hub was imported
    with pytest.raises(UserError) as caught:
        load_backbone(BackboneSpec("ViT-B-16", "openai"))
    message = str(caught.value)
    assert empty_hub == []  # not even a name lookup
    assert "\n" not in message
    assert "HF_HUB_OFFLINE" in message and "timm/vit_base_patch16_clip_224.openai" in message
    assert "--pretrained PATH" in message and "--pretrained none" in message


def test_an_unreachable_hub_fails_fast_in_one_try(empty_hub, capfd):
    """Without offline mode, one request per failure, no back-off: open_clip's path takes about a minute."""
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        load_backbone(BackboneSpec("ViT-B-16", "openai"))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert elapsed < 10, elapsed  # before: 1+2+4+8+8 s of back-off for the first file alone
    assert 1 <= len(empty_hub) <= 2, empty_hub  # one request (a resolver may ask twice): no retries
    assert "\n" not in message and "could not fetch pretrained weights ViT-B-16/openai (offline?)" in message
    assert "--pretrained PATH" in message
    out, err = capfd.readouterr()
    assert "Retrying" not in out + err and "thrown while requesting" not in out + err


def test_console_script_offline_fails_in_one_line(cli, tmp_path):
    """The issue's case: a pretrained openai backbone with HF_HUB_OFFLINE=1 and an empty cache, through the CLI."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    workspace = tmp_path / "ws"
    assert cli("partition", "--dataset", "synthetic", "--clients", "2", workspace=workspace).exit_code == 0
    args = ["--workspace", str(workspace), "--quiet", "train", "--method", "promptfl", "--rounds", "1",
            "--backbone", "ViT-B-16", "--pretrained", "openai"]
    started = time.monotonic()
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path / "empty-hf", HF_HUB_OFFLINE="1"))
    elapsed = time.monotonic() - started
    # Generous (interpreter start and imports on a loaded machine); the retry loop alone took about 50 s.
    assert elapsed < 60, elapsed
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: pretrained weights ViT-B-16/openai are not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in lines[0] and "--pretrained PATH" in lines[0] and "--pretrained none" in lines[0]


# -- a populated cache ----------------------------------------------------------------------
_REPO = "pfedmoap-test/tiny-vit-cached"
_CHILD = textwrap.dedent(
    """
    import socket, sys
    import torch
    attempts = []
    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network attempt in an offline test")
    socket.getaddrinfo = no_network
    socket.socket.connect = no_network
    from pfedmoap_cli.compat import import_open_clip
    from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
    open_clip = import_open_clip()
    # A pretrained tag of the tiny architecture, hosted on the Hub as open_clip's tags are.
    open_clip.pretrained._PRETRAINED["tiny-vit"] = {"cachetest": open_clip.pretrained._pcfg(hf_hub=sys.argv[1] + "/")}
    clip = load_backbone(BackboneSpec("tiny-vit", "cachetest"))
    torch.save(clip.clip.state_dict(), sys.argv[2])
    print("attempts", len(attempts))
    """
)


def _populate_cache(hf_home: Path, repo: str, filename: str, payload: bytes) -> Path:
    """The layout huggingface_hub writes: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    storage = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(payload).hexdigest()
    blob = storage / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    snapshot = storage / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def test_cached_weights_load_offline(tmp_path):
    from huggingface_hub import try_to_load_from_cache
    from safetensors.torch import save

    from pfedmoap_cli.compat import import_open_clip
    from pfedmoap_cli.model.backbone import register_tiny_configs

    open_clip = import_open_clip()
    register_tiny_configs()
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        weights = {key: value.clone().contiguous() for key, value in open_clip.create_model("tiny-vit").state_dict().items()}
    hf_home = tmp_path / "hf"
    # open_clip asks for open_clip_model.safetensors first (the .bin being its default name).
    snapshot = _populate_cache(hf_home, _REPO, "open_clip_model.safetensors", save(weights))
    assert try_to_load_from_cache(_REPO, "open_clip_model.safetensors", cache_dir=hf_home / "hub") == str(snapshot)
    out = tmp_path / "loaded.pt"
    done = subprocess.run([sys.executable, "-c", _CHILD, _REPO, str(out)], capture_output=True, text=True, timeout=300,
                          env=_env(hf_home, HF_HUB_OFFLINE="1"), cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "attempts 0" in done.stdout
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())

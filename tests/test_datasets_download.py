"""``pfedmoap download`` and its machinery, with local file:// archives (never the network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import one_line_error
from pfedmoap_cli.data import download as dl
from pfedmoap_cli.data.resources import Resource, split_checksum
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.data.sources.cifar import Cifar10Source
from pfedmoap_cli.data.sources.dtd import DTDSource
from pfedmoap_cli.data.sources.office_caltech10 import OfficeCaltech10Source
from pfedmoap_cli.errors import DataError
from test_datasets_fakes import decode, write_cifar, write_coop, write_office


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def make_tar(archive: Path, source_dir: Path, arcname: str) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source_dir, arcname=arcname)
    return archive


def make_zip(archive: Path, source_dir: Path, arcname: str) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source_dir.rglob("*")):
            zf.write(path, f"{arcname}/{path.relative_to(source_dir).as_posix()}")
    return archive


def no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ----------------------------------------------------------------------------- fetch


def test_fetch_file_url_verifies_checksum(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 1000)
    dest = tmp_path / "out" / "file.bin"
    sha = dl.fetch(src.as_uri(), dest, md5(src), progress=False)
    assert dest.read_bytes() == src.read_bytes() and sha == hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="checksum mismatch") as error:
        dl.fetch(src.as_uri(), tmp_path / "bad.bin", "md5:" + "0" * 32, progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()


def test_fetch_offline_fails_fast_with_one_line(tmp_path: Path, monkeypatch) -> None:
    no_network(monkeypatch)
    with pytest.raises(DataError, match="cannot fetch https://example.org/x.tgz .*download it by hand to") as error:
        dl.fetch("https://example.org/x.tgz", tmp_path / "x.tgz", None, progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "x.tgz.part").exists()


def test_fetch_passes_a_short_timeout(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake(request, timeout):
        seen["timeout"] = timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    with pytest.raises(DataError, match="timed out"):
        dl.fetch("https://example.org/x", tmp_path / "x", None, progress=False)
    assert seen["timeout"] <= 10


def test_checksum_format_is_checked() -> None:
    assert split_checksum("md5:" + "a" * 32) == ("md5", "a" * 32)
    for bad in ("a" * 32, "md5:xyz", "sha1:" + "a" * 40):
        with pytest.raises(ValueError):
            split_checksum(bad)


def test_unsafe_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="unsafe"):
        dl.extract(archive, tmp_path / "into")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- a whole dataset


@pytest.fixture
def dtd_mirror(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A local 'server' with DTD's archive (top folder dtd/) and DTDSource pointed at it."""
    staging = tmp_path / "staging"
    write_coop(staging, "dtd", train=1, val=0, test=1)
    split = staging / "dtd" / "split_zhou_DescribableTextures.json"
    split_copy = tmp_path / "server" / split.name
    split_copy.parent.mkdir(parents=True)
    split_copy.write_bytes(split.read_bytes())
    split.unlink()
    archive = make_tar(tmp_path / "server" / "dtd-r1.0.1.tar.gz", staging / "dtd", "dtd")
    resources = (
        Resource("dtd-r1.0.1.tar.gz", archive.as_uri(), md5(archive), creates="dtd/images", extract_to="."),
        Resource("dtd/split_zhou_DescribableTextures.json", "https://drive.google.com/file/d/ID/view", None,
                 creates="dtd/split_zhou_DescribableTextures.json", manual=True),
    )
    monkeypatch.setattr(DTDSource, "resources", resources)
    return tmp_path / "data", split_copy


def test_download_then_manual_step_then_rerun_skips(cli, dtd_mirror, monkeypatch) -> None:
    root, split_copy = dtd_mirror
    result = cli("--data-root", str(root), "download", "--dataset", "dtd")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "download https://drive.google.com/file/d/ID/view" in result.stdout
    assert f"save it as {root / 'dtd' / 'split_zhou_DescribableTextures.json'}" in result.stdout
    assert "incomplete" in one_line_error(result)
    assert (root / "dtd" / "images").is_dir() and (root / "dtd-r1.0.1.tar.gz").is_file()
    assert not list(root.rglob(".pfedmoap-unpack-*"))

    listing = cli("--data-root", str(root), "download", "--list")
    assert "dtd                incomplete missing dtd/split_zhou_DescribableTextures.json" in listing.stdout

    (root / "dtd" / split_copy.name).write_bytes(split_copy.read_bytes())  # the user's manual step
    monkeypatch.setattr(dl, "fetch", lambda *a, **k: pytest.fail("nothing should be fetched again"))
    result = cli("--data-root", str(root), "download", "--dataset", "dtd")
    assert result.exit_code == 0, result.stderr
    assert "dtd/images: present, skipped" in result.stdout and "ready" in result.stdout
    source = open_dataset("dtd", root)
    assert decode(source.load_image(source.samples("test")[5]))[0] == source.samples("test")[5].label
    assert "dtd                present" in cli("--data-root", str(root), "download", "--list").stdout


def test_download_reuses_a_verified_archive(cli, dtd_mirror, monkeypatch) -> None:
    root, _ = dtd_mirror
    archive_uri = DTDSource.resources[0].url
    root.mkdir(parents=True)
    (root / "dtd-r1.0.1.tar.gz").write_bytes(Path(urllib.request.url2pathname(archive_uri[len("file://"):])).read_bytes())
    monkeypatch.setattr(dl, "fetch", lambda *a, **k: pytest.fail("a verified archive must not be fetched again"))
    result = cli("--data-root", str(root), "download", "--dataset", "dtd")
    assert "already downloaded" in result.stdout and (root / "dtd" / "images").is_dir()


def test_download_checksum_mismatch(cli, dtd_mirror, monkeypatch) -> None:
    root, _ = dtd_mirror
    good = DTDSource.resources
    monkeypatch.setattr(DTDSource, "resources", (Resource(good[0].file, good[0].url, "md5:" + "0" * 32, creates=good[0].creates, extract_to="."),))
    message = one_line_error(cli("--data-root", str(root), "download", "--dataset", "dtd"))
    assert "checksum mismatch" in message and not (root / "dtd").exists()


def test_download_offline_is_one_line(cli, tmp_path: Path, monkeypatch) -> None:
    no_network(monkeypatch)
    message = one_line_error(cli("--data-root", str(tmp_path), "download", "--dataset", "cifar10"))
    assert "cannot fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message and "network" in message


def test_cifar_download_checks_the_unpacked_batches(cli, tmp_path: Path, monkeypatch) -> None:
    staging = tmp_path / "staging"
    write_cifar(staging, "cifar10")
    archive = make_tar(tmp_path / "server" / "cifar-10-python.tar.gz", staging / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setattr(Cifar10Source, "resources", (
        Resource("cifar-10-python.tar.gz", archive.as_uri(), md5(archive), creates="cifar-10-batches-py", extract_to="."),
    ))
    root = tmp_path / "data"
    # the fake batches are not the real ones: torchvision's per-file md5s reject them
    assert "md5 mismatch" in one_line_error(cli("--data-root", str(root), "download", "--dataset", "cifar10"))
    fake_md5 = {f: md5(staging / "cifar-10-batches-py" / f)[4:] for f in Cifar10Source.content_md5}
    monkeypatch.setattr(Cifar10Source, "content_md5", fake_md5)
    result = cli("--data-root", str(root), "download", "--dataset", "cifar10")
    assert result.exit_code == 0, result.stderr
    assert len(open_dataset("cifar10", root).samples("train")) == 30


def test_manual_archive_is_unpacked_once_in_place(cli, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_office(staging, train=1, test=1)
    root = tmp_path / "data"
    message = one_line_error(cli("--data-root", str(root), "download", "--dataset", "office_caltech10"))
    assert "office_caltech10 is incomplete" in message
    make_zip(root / "office_caltech_10_dataset.zip", staging / "office_caltech_10", "office_caltech_10")
    result = cli("--data-root", str(root), "download", "--dataset", "office_caltech10")
    assert result.exit_code == 0, result.stderr
    assert len(open_dataset("office_caltech10", root).samples("train")) == 40
    assert OfficeCaltech10Source.resources[0].manual


def test_inner_archive_caltech_style(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_coop(staging, "caltech101", train=1, val=0, test=1)
    inner = make_tar(tmp_path / "wrap" / "caltech-101" / "101_ObjectCategories.tar.gz",
                     staging / "caltech-101" / "101_ObjectCategories", "101_ObjectCategories")
    (tmp_path / "wrap" / "caltech-101" / "Annotations.tar").write_bytes(b"")
    outer = make_zip(tmp_path / "server" / "caltech-101.zip", tmp_path / "wrap" / "caltech-101", "caltech-101")
    dl.extract(outer, tmp_path / "data" / "caltech-101", inner="caltech-101/101_ObjectCategories.tar.gz")
    assert (tmp_path / "data" / "caltech-101" / "101_ObjectCategories" / "Faces" / "image_0001.jpg").is_file()
    assert not (tmp_path / "data" / "caltech-101" / "Annotations.tar").exists()
    assert inner.is_file()


def test_list_shows_every_dataset(cli, tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1)
    result = cli("--data-root", str(tmp_path), "download", "--list")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) >= {"flowers102", "oxford_pets", "food101", "caltech101", "dtd", "domainnet", "domainnet_full",
                          "office_caltech10", "cifar10", "cifar100", "synthetic", "imagefolder"}
    assert lines["office_caltech10"].split()[1] == "present"
    assert lines["cifar100"].split()[1] == "missing"
    assert "nothing to download" in lines["synthetic"] or "built in" in lines["synthetic"]


def test_unknown_dataset(cli) -> None:
    assert "unknown dataset 'imagenet77'" in one_line_error(cli("download", "--dataset", "imagenet77"))

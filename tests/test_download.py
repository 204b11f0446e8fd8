"""`fedpose data download lsp` without a network: the archive is built here from LSP's files, laid
out as the published lsp_dataset.zip, and served by a file:// URL or given with --from."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from fedpose.cli import main
from fedpose.data.download import SOURCES, Source, _load_lsp_all, download_dataset
from fedpose.data.records import DatasetError


def _lsp_zip(root: Path, out: Path, top: str = "") -> Path:
    """The published archive's layout: images/, joints.mat, README.txt at the top (or all under
    one folder `top`)."""
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for image in sorted((root / "images").glob("im*.jpg")):
            zf.write(image, f"{prefix}images/{image.name}")
        zf.write(root / "joints.mat", f"{prefix}joints.mat")
        zf.writestr(f"{prefix}README.txt", "Leeds Sports Pose Dataset\n")
    return out


def _sample_source(lsp_dir: Path) -> Source:
    """LSP's source with the 40-image sample's digest and count."""
    digest = hashlib.sha1((lsp_dir / "joints.mat").read_bytes()).hexdigest()
    return Source(
        name="lsp",
        url="unused",
        page=SOURCES["lsp"].page,
        files_sha1={"joints.mat": digest},
        required=("joints.mat",),
        num_images=40,
        check=_load_lsp_all,
    )


@pytest.mark.parametrize("top", ["", "lsp_dataset"])
def test_sample_archive_by_file_url_unpacks_checked(lsp_dir, tmp_path, top):
    archive = _lsp_zip(lsp_dir, tmp_path / "lsp_dataset.zip", top)
    dest = tmp_path / "data" / "lsp"
    src = _sample_source(lsp_dir)
    got, fetched = download_dataset("lsp", dest, url=archive.as_uri(), source=src)
    assert (got, fetched) == (dest, True)
    assert len(list((dest / "images").glob("*.jpg"))) == 40
    assert (dest / "joints.mat").read_bytes() == (lsp_dir / "joints.mat").read_bytes()
    # nothing left beside it: no partial folder, no downloaded archive
    assert sorted(p.name for p in dest.parent.iterdir()) == ["lsp"]
    # a second call finds it complete and changes nothing
    assert download_dataset("lsp", dest, url="file:///nonexistent.zip", source=src) == (dest, False)


def test_a_wrong_checksum_leaves_nothing(lsp_dir, tmp_path):
    archive = _lsp_zip(lsp_dir, tmp_path / "lsp_dataset.zip")
    dest = tmp_path / "data" / "lsp"
    # the real source's digest: the sample's cut joints.mat is not the published file
    with pytest.raises(DatasetError, match="SHA-1 .* the published file has ccfaef9b"):
        download_dataset("lsp", dest, from_file=archive)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("member", "problem"),
    [("../evil.txt", "would leave"), ("/abs.txt", "would leave"), ("link", "a link")],
)
def test_hostile_archives_are_refused(lsp_dir, tmp_path, member, problem):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("joints.mat", b"x")
        info = zipfile.ZipInfo(member)
        if member == "link":
            info.external_attr = 0o120777 << 16  # a symbolic link
        zf.writestr(info, b"target")
    dest = tmp_path / "out" / "lsp"
    with pytest.raises(DatasetError, match=problem):
        download_dataset("lsp", dest, from_file=archive, source=_sample_source(lsp_dir))
    assert list(dest.parent.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_cli_refuses_an_existing_other_folder_and_a_dead_url(tmp_path, capsys):
    other = tmp_path / "lsp"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["data", "download", "lsp", "--to", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remove it or choose another" in err[0]
    assert (other / "notes.txt").read_text() == "mine"
    dest = tmp_path / "new"
    url = (tmp_path / "missing.zip").as_uri()
    assert main(["data", "download", "lsp", "--to", str(dest), "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {url}: cannot download")
    assert not dest.exists()


@pytest.mark.slow  # seconds of work: make test-slow
def test_the_full_archive_from_a_local_copy(datasets, tmp_path, capsys):
    """The real check: LSP's 2000 images and the published joints.mat, through the command."""
    archive = _lsp_zip(datasets / "lsp", tmp_path / "lsp_dataset.zip")
    dest = tmp_path / "data" / "lsp"
    assert main(["data", "download", "lsp", "--to", str(dest), "--from", str(archive)]) == 0
    assert f"lsp: unpacked and checked in {dest}" in capsys.readouterr().out
    assert len(list((dest / "images").glob("im*.jpg"))) == 2000

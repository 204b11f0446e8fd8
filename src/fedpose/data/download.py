"""`fedpose data download`: fetch a public dataset from its own source, check it, unpack it.

Only LSP is fetched this way: its archive is public and small (about 15 MB unpacked); MPII and
COCO need their licences accepted on their pages (docs/datasets.md). The archive is read with
urllib (any URL it opens: https://, http://, file://) or taken from a local copy (`from_file`),
written beside the destination, and unpacked entry by entry into a temporary folder that becomes
the destination only once the data passes its checks, so an interrupted or hostile download
leaves no half-filled dataset:

- no entry may leave the folder (absolute names, `..`), none may be a link or a device, and the
  sizes are bounded (a zip bomb stops at MAX_UNPACKED_BYTES);
- the labels file must have its published SHA-1 and every image the loader expects must exist;
  then the loader reads it with every check training applies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedpose.data.records import DatasetError

MAX_ARCHIVE_BYTES = 200 * 2**20  # LSP's archive is ~ 35 MB with its visualised copies
MAX_UNPACKED_BYTES = 500 * 2**20
CHUNK = 2**20
ENV_VAR = "FEDPOSE_DATASETS"


@dataclass(frozen=True)
class Source:
    name: str
    url: str  # where the dataset's own page points
    page: str  # the page that names the licence and the citation
    files_sha1: dict[str, str]  # relative path -> SHA-1, each checked when present...
    required: tuple[str, ...]  # ...and these must be present
    num_images: int  # images/im0001.jpg ... as the loader names them
    check: Callable[[Path], object] | None = None  # the loader, run on the unpacked folder


def _load_lsp_all(root: Path) -> object:
    from fedpose.data.lsp import load_lsp  # here: the loader needs scipy, the CLI does not

    return load_lsp(root, "all")


SOURCES: dict[str, Source] = {
    "lsp": Source(
        name="lsp",
        url="http://sam.johnson.io/research/lsp_dataset.zip",
        page="http://sam.johnson.io/research/lsp.html",
        files_sha1={
            "joints.mat": "ccfaef9bd4d6afbb01cdfbcf34b0dc055c13283f",
            "joints_OC.mat": "ddb419426c6d51b95b0116bd0fd7a035694b0f1d",
        },
        required=("joints.mat",),
        num_images=2000,
        check=_load_lsp_all,
    ),
}


def default_destination(name: str) -> Path:
    """$FEDPOSE_DATASETS/<name> when that variable is set (where the tests and the configs
    look), else data/<name> under the working directory."""
    base = os.environ.get(ENV_VAR)
    return Path(base) / name if base else Path("data") / name


def download_dataset(
    name: str,
    dest: str | Path | None = None,
    *,
    url: str | None = None,
    from_file: str | Path | None = None,
    source: Source | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[Path, bool]:
    """Fetch, check and unpack dataset `name` into `dest`; (dest, whether anything was done).

    An existing `dest` that already passes the checks is kept as it is; any other existing
    `dest` is refused, never overwritten. `url` replaces the source's address; `from_file`
    unpacks a local copy of the archive instead of downloading. progress(bytes, total or None)
    is called as the download goes.
    """
    src = source or SOURCES.get(name)
    if src is None:
        raise ValueError(f"unknown dataset {name!r} to download; known: {', '.join(SOURCES)}")
    dest = Path(dest) if dest else default_destination(name)
    if dest.exists():
        try:
            verify(dest, src)
        except DatasetError as e:
            raise DatasetError(
                dest, f"exists and is not a complete {name} ({e}); remove it or choose another"
            ) from None
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    archive = dest.with_name(f".{dest.name}.download")
    try:
        if from_file is not None:
            archive_path = Path(from_file)
            if not archive_path.is_file():
                raise DatasetError(archive_path, "no such file")
        else:
            _fetch(url or src.url, archive, progress)
            archive_path = archive
        shutil.rmtree(partial, ignore_errors=True)
        unpack_zip(archive_path, partial)
        verify(partial, src)
        os.replace(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return dest, True


def _fetch(url: str, out: Path, progress: Callable[[int, int | None], None] | None) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, ValueError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(url, f"cannot download: {reason}") from None
    with response, out.open("wb") as f:
        length = response.headers.get("Content-Length") if response.headers else None
        total = int(length) if length and length.isdigit() else None
        done = 0
        while chunk := response.read(CHUNK):
            done += len(chunk)
            if done > MAX_ARCHIVE_BYTES:
                problem = f"larger than {MAX_ARCHIVE_BYTES >> 20} MiB: not the archive"
                raise DatasetError(url, problem)
            f.write(chunk)
            if progress:
                progress(done, total)


def unpack_zip(archive: Path, out: Path) -> list[Path]:
    """Unpack a zip archive into `out` (created), refusing entries that would leave it, links,
    and archives that unpack to more than MAX_UNPACKED_BYTES. A single top-level folder holding
    everything is dropped, so `out` holds the dataset's own files either way."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(archive, f"not a zip archive ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        names = [_safe_name(archive, m) for m in members]
        total = sum(m.file_size for m in members)
        if total > MAX_UNPACKED_BYTES:
            raise DatasetError(archive, f"unpacks to {total} bytes, more than a dataset here needs")
        tops = {n.parts[0] for n in names}
        strip = 1 if len(tops) == 1 and all(len(n.parts) > 1 for n in names) else 0
        out.mkdir(parents=True)
        written = []
        for member, name in zip(members, names, strict=True):
            target = out.joinpath(*name.parts[strip:])
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # zipfile stops at the header's size and checks the CRC: a lying header fails
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, EOFError, NotImplementedError) as e:
                raise DatasetError(archive, f"damaged entry ({e})", member.filename) from None
            written.append(target)
    return written


def _safe_name(archive: Path, member: zipfile.ZipInfo) -> PurePosixPath:
    name = PurePosixPath(member.filename.replace("\\", "/"))
    mode = member.external_attr >> 16
    if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
        raise DatasetError(archive, "an entry would leave the destination", member.filename)
    # Unix archivers store the file type; others (and zipfile.writestr) store none, a plain file
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DatasetError(archive, "an entry is a link or a device, not a file", member.filename)
    return name


def verify(root: Path, src: Source) -> None:
    """The dataset's checks on an unpacked folder: published SHA-1s, the expected images, then
    its loader; DatasetError naming the first problem."""
    for required in src.required:
        if not (root / required).is_file():
            raise DatasetError(root / required, "missing")
    for rel, digest in src.files_sha1.items():
        path = root / rel
        if path.is_file() and _sha1(path) != digest:
            raise DatasetError(path, f"SHA-1 {_sha1(path)}, the published file has {digest}")
    missing = [
        f"im{i:04d}.jpg"
        for i in range(1, src.num_images + 1)
        if not (root / "images" / f"im{i:04d}.jpg").is_file()
    ]
    if missing:
        raise DatasetError(root / "images", f"{len(missing)} images missing, first {missing[0]}")
    if src.check is not None:
        src.check(root)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()

"""The run folder is the run's alone.

A run folder (`out_dir/<name>`) holds what one run writes: `config.json`, `clients.json`,
`metrics.jsonl`, `checkpoints/`, `model.safetensors`. Its contents may have been touched by
anybody (a copied folder, a planted link), and two runs of one name may be started at once, so:

- every write goes to a new file beside its target, then renames over it: a rename replaces a
  link instead of writing through it, and a kill leaves the old file or the new one;
- links inside the folder (and between `out_dir` and the folder) are refused before anything is
  read or written, so nothing outside `out_dir` is read, written or deleted through them;
- a lock (`.lock`, held with `flock` for the life of the process) makes a second run of the same
  folder fail with one line; the kernel drops the lock when its process dies, so a killed run
  never blocks its `--resume`;
- the folder records which command made it (`.fedpose-run.json`): a `train` into a folder made
  by `run` or `compare` (or the reverse) is refused unless forced; a command the user gave no
  name takes its own folder instead (`default_name`: runs/demo-train beside `make demo`'s
  runs/demo), and an output file or folder the user names never replaces what another command
  made (`check_output`);
- a fresh start moves the previous run's results aside only after every check has passed,
  the ability to write included.

This module imports only fedpose.bounded (a leaf), so every layer (fl/, engine/, model/, data/)
may use it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpose.bounded import loads_json

LOCK_FILE = ".lock"
OWNER_FILE = ".fedpose-run.json"
# what a run writes, by kind: a fresh start moves these aside; anything else is left alone
RESULT_FILES = (
    "metrics.jsonl",
    "model.safetensors",
    "config.json",
    "clients.json",
    "privacy.json",
    "flower_timing.jsonl",
)
RESULT_DIRS = ("checkpoints",)


class RunDirError(ValueError):
    """The run folder cannot be used: a link inside it, a lock held by another run, a folder
    made by another command, a result path of the wrong kind."""


# ----------------------------------------------------------------------------- writing
def write_file(path: str | Path, data: bytes | str, durable: bool = False) -> Path:
    """Write `data` to a new file beside `path`, then rename it over `path`.

    The temporary is created exclusively and never through a link (O_EXCL | O_NOFOLLOW); the
    rename replaces a link at `path` rather than following it. `durable` flushes the data to the
    disk before the rename (checkpoints, model files). Returns `path`.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove_leftover(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove_leftover(tmp)
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a JSON-lines file by writing the whole file anew and renaming it: a
    link at `path` is refused, never written through."""
    path = Path(path)
    write_file(path, read_regular(path) + line.rstrip("\n").encode() + b"\n")


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file, b"" when it does not exist; a link or a folder is refused."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(
                f"{path}: a link inside the run folder; fedpose never follows it"
            ) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RunDirError(f"{path}: not a regular file")
        return f.read()


def _remove_leftover(tmp: Path) -> None:
    # a temporary of a killed process with a recycled pid, or a planted link: removed, never
    # opened (unlink removes a link itself)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- checks
def check_no_links(run_dir: str | Path, out_dir: str | Path) -> None:
    """Refuse a link anywhere between `out_dir` and `run_dir` and anywhere inside `run_dir`.

    `out_dir` itself is the user's choice and may be a link; what lies below it is the runs'.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    node = out_dir
    for part in run_dir.relative_to(out_dir).parts:
        node = node / part
        if node.is_symlink():
            raise RunDirError(
                f"{node}: a link inside out_dir; a run folder and its parents must be real "
                f"folders (fedpose never writes through a link)"
            )
    if not run_dir.is_dir():
        return
    for top, dirs, files in os.walk(run_dir, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(top) / name
            if p.is_symlink():
                raise RunDirError(
                    f"{p}: a link inside the run folder; fedpose never writes or deletes "
                    f"through a link: remove it (or use another run name)"
                )


def check_result_kinds(run_dir: str | Path) -> None:
    """Each result path that exists has the kind fedpose writes there (a file or a folder)."""
    run_dir = Path(run_dir)
    for name in RESULT_FILES:
        p = run_dir / name
        if p.exists() and not p.is_file():
            raise RunDirError(f"{p}: not a file; fedpose writes its {name} there: move it away")
    for name in RESULT_DIRS:
        p = run_dir / name
        if p.exists() and not p.is_dir():
            raise RunDirError(f"{p}: not a folder; fedpose keeps its {name} there: move it away")


def owner(run_dir: str | Path) -> str | None:
    """The command that made the folder, or None (a new folder, or one of an older fedpose)."""
    try:
        text = read_regular(Path(run_dir) / OWNER_FILE).decode("utf-8", "replace")
        value = loads_json(text, OWNER_FILE).get("command") if text else None
    except (OSError, ValueError, AttributeError):  # unreadable, a link, not JSON: no record
        return None
    return value if isinstance(value, str) else None


def nearest_owner(path: str | Path) -> tuple[str, Path] | None:
    """(the command, the folder) of the run folder that `path` lies in: `path` itself when it
    is a folder, else its nearest parent with a record of the command that made it; None
    outside every run folder."""
    path = Path(path).absolute()
    start = path if path.is_dir() else path.parent
    for folder in (start, *start.parents):
        made_by = owner(folder)
        if made_by is not None:
            return made_by, folder
    return None


def check_output(path: str | Path, command: str, force: bool = False) -> None:
    """Refuse to replace `path`, an output the user named (a file, or a folder of outputs),
    when it exists inside a folder another command made, unless `force`. A path that does not
    exist yet replaces nothing and is never refused."""
    path = Path(path)
    if force or not (path.exists() or path.is_symlink()):
        return
    found = nearest_owner(path)
    if found is not None and found[0] != command:
        made_by, folder = found
        where = "" if folder == path.absolute() else f"in {_shown(folder)}, "
        raise RunDirError(
            f"{path}: {where}a folder made by `fedpose {made_by}`; `fedpose {command}` would "
            f"overwrite its results: choose another path (or --force to overwrite)"
        )


def output_folder(path: str | Path, command: str, force: bool = False) -> Path:
    """The folder of a command's outputs, made (and recorded as `command`'s) if missing; an
    existing folder another command made is refused unless `force` (check_output)."""
    path = Path(path)
    check_output(path, command, force)
    if not path.exists():
        path.mkdir(parents=True)
        mark(path, command)
    return path


def default_name(out_dir: str | Path, name: str, command: str, suffix: str | None = None) -> str:
    """The run name `command` takes when the user named none: the config's `name`, unless
    `out_dir/name` holds another command's results; then `name-<suffix>` (the command by
    default), e.g. runs/demo-train for a `fedpose train` of the config `make demo` compares.
    The same folders give the same name, so --resume finds the run again."""
    if owner(Path(out_dir) / name) in (None, command):
        return name
    return f"{name}-{suffix or command}"


def _shown(folder: Path) -> Path:
    """`folder` relative to the working directory when it lies below it (messages stay short)."""
    try:
        return folder.relative_to(Path.cwd())
    except ValueError:
        return folder


def check_owner(run_dir: str | Path, command: str, force: bool = False) -> None:
    """Refuse a folder made by another command (unless `force`)."""
    made_by = owner(run_dir)
    if made_by is not None and made_by != command and not force:
        raise RunDirError(
            f"{run_dir}: made by `fedpose {made_by}`; `fedpose {command}` would overwrite its "
            f"results: give this run another --name (or --force to overwrite)"
        )


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """The lock on one run folder, held until `release` or the end of the process."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir = run_dir
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            # the lock file stays: removing it would let a third process lock a new inode
            # while a second still waits on the old one
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock(run_dir: str | Path) -> RunLock:
    """Lock `run_dir` (made if missing) for this process, or RunDirError naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(f"{path}: a link inside the run folder; remove it") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{run_dir}: in use by another fedpose process (pid {holder}); two runs of one "
            f"folder would overwrite each other's files: wait for it, or use another --name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(run_dir, fd)


@contextmanager
def claim(
    run_dir: str | Path, out_dir: str | Path, command: str, force: bool = False
) -> Iterator[RunLock]:
    """Check and lock a run folder for `command`; the lock is held inside the `with` block.

    Checked, before anything in the folder is read or written: no link between `out_dir` and the
    folder or inside it, no other process holding it, no other command's folder (unless `force`),
    every result path of the right kind.
    """
    run_dir = Path(run_dir)
    check_no_links(run_dir, out_dir)
    held = lock(run_dir)
    try:
        # the links checked again, now that no other run can change the folder
        check_usable(run_dir, out_dir, command, force)
        yield held
    finally:
        held.release()


def check_usable(
    run_dir: str | Path, out_dir: str | Path, command: str, force: bool = False
) -> None:
    """claim's checks without the lock, for a process that prepares a folder another process
    will claim (the Flower ServerApp's): no link, no other command's folder (unless `force`),
    every result path of the right kind."""
    check_no_links(run_dir, out_dir)
    check_owner(run_dir, command, force)
    check_result_kinds(run_dir)


# ----------------------------------------------------------------------------- starting
def start(run_dir: str | Path, command: str, resume: bool, config_json: str) -> Path:
    """Begin writing a claimed run folder: check that it can be written, then (on a fresh start)
    move the previous run's results aside and delete them, record the command and write
    `config.json`. Call it after every other check (config, data, checkpoint) has passed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write-test"
    write_file(probe, b"")
    probe.unlink()
    if not resume:
        _clear_results(run_dir)
    mark(run_dir, command)
    write_file(run_dir / "config.json", config_json)
    return run_dir


def mark(run_dir: str | Path, command: str) -> None:
    """Record that `command` made the (claimed) folder."""
    write_file(Path(run_dir) / OWNER_FILE, json.dumps({"command": command}) + "\n")


def _clear_results(run_dir: Path) -> None:
    found = [run_dir / n for n in RESULT_FILES + RESULT_DIRS if (run_dir / n).exists()]
    if not found:
        return
    aside = run_dir / f".previous-{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    # renames inside one folder: the results are either all in place or all aside
    for p in found:
        os.rename(p, aside / p.name)
    # rmtree never follows links (and the folder holds none: claim checked)
    shutil.rmtree(aside)

"""Where the in-process engine keeps each client's state between its rounds.

A client's state (FedBN's BatchNorm tensors, FedDyn's linear term g_k, a full model's worth of
numbers) outlives the round, so a federation of 1000 FedDyn clients would hold 1000 models in
memory. `ClientStateStore` with a directory keeps every state in a safetensors file instead and
memory holds only the index: memory grows with the clients trained per round, not with the
federation.

Files are serialized and written by a background thread while the next client trains (at most a
few writes in flight, one per client): `put` takes the state's tensors over, as the in-memory
store does, so the caller must not change them afterwards. Reading a client's state, a
checkpoint's index and the disk figures wait for the writes they depend on, and a write that
failed raises there.

Resuming must see the states as they were at the checkpoint, while training after it rewrites
them. So a state is never overwritten: each write is a new generation (`<client>.<gen>.
safetensors`), the checkpoint records the index {client: generation}, and a file is deleted only
once no checkpoint that may still be on disk refers to it (the last two indexes handed out).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedpose.bounded import loads_json

STATE_FILE = re.compile(r"(\d+)\.(\d+)\.safetensors")
# what an interrupted `save_file` leaves behind: its temporary, never renamed into place
UNFINISHED_FILE = re.compile(r"\.tmp[A-Za-z0-9]{6}")
MAX_PENDING_WRITES = 4  # state files in flight: each keeps its client's state in memory


def _pack(state: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """One flat tensor per dtype plus a layout: writing and reading cost time per tensor, and a
    model's BatchNorm state alone is dozens of small tensors."""
    chunks: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    layout = []
    for key, tensors in state.items():
        for name, t in tensors.items():
            t = t.detach().cpu()
            group = str(t.dtype).removeprefix("torch.")
            offset = sizes.get(group, 0)
            chunks.setdefault(group, []).append(t.reshape(-1))
            sizes[group] = offset + t.numel()
            layout.append([key, name, group, offset, list(t.shape)])
    # a lone tensor (FedDyn's flat g_k) is written as it is, without a copy
    packed = {g: parts[0] if len(parts) == 1 else torch.cat(parts) for g, parts in chunks.items()}
    return packed, {"layout": json.dumps(layout)}


def _unpack(packed: dict[str, torch.Tensor], metadata: dict) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, name, group, offset, shape in loads_json(metadata["layout"], "client state layout"):
        numel = math.prod(shape)
        state.setdefault(key, {})[name] = packed[group][offset : offset + numel].view(shape)
    return state


class ClientStateError(ValueError):
    """A client state file that cannot be read (truncated, not safetensors, malformed)."""


@functools.cache
def _file_mode() -> int:
    """The mode the run folder's other files get (0o644 less the umask): safetensors creates
    its temporary 0o600, which would lock a resume by another member of the group out."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux: ask, and put it back
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o644 & ~umask


def _write(path: Path, packed: dict[str, torch.Tensor], metadata: dict, stale: Path | None) -> None:
    # safetensors (>= 0.8) writes a new temporary beside `path` and renames it into place, so a
    # link planted at `path` is replaced, not written through; it reads the tensors' memory
    # directly, without a serialized copy
    try:
        save_file(packed, path, metadata=metadata)
    except SafetensorError as e:  # its I/O errors, as the OSError they are
        raise OSError(f"{path}: client state not written ({e})") from None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # the file itself, never a link's target
    try:
        os.fchmod(fd, _file_mode())
    finally:
        os.close(fd)
    if stale is not None:
        stale.unlink(missing_ok=True)


class ClientStateStore:
    """{client id: {key: {tensor name: tensor}}}, in memory (directory=None) or on disk."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[int, dict] = {}
        self._index: dict[int, int] = {}  # client -> generation of its file
        self._kept: list[dict[int, int]] = []  # indexes handed to checkpoints, newest last
        self._superseded: set[tuple[int, int]] = set()  # old files a kept index still needs
        self._made_directory = False
        self._writer: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}  # client -> the write of its newest file

    def __len__(self) -> int:
        return len(self._index) if self.directory is not None else len(self._memory)

    def _path(self, client: int, generation: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{client}.{generation}.safetensors"

    def get(self, client: int) -> dict:
        if self.directory is None:
            return self._memory.get(client, {})
        generation = self._index.get(client)
        if generation is None:
            return {}
        self._wait(client)
        path = self._path(client, generation)
        try:
            if path.is_symlink():
                raise ValueError("a link, never followed")
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata()
                packed = {group: f.get_tensor(group) for group in f.keys()}
            return _unpack(packed, metadata)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            # a truncated, pickled or hostile file: one line naming it, never a traceback
            raise ClientStateError(f"{path}: damaged client state file ({e})") from None

    def put(self, client: int, state: dict) -> None:
        """Keep `state` as the client's newest. The store takes its tensors over (the writer
        thread reads them after put returns): the caller must not change them afterwards."""
        if self.directory is None:
            self._memory[client] = state
            return
        old = self._index.get(client)
        stale = None  # the file this put makes obsolete, when no kept index names it
        if old is not None:
            if any(ix.get(client) == old for ix in self._kept):
                self._superseded.add((client, old))
            else:
                stale = self._path(client, old)
        packed, metadata = _pack(state)
        if packed:
            generation = 0 if old is None else old + 1
            # created on first use: building a transport must not touch the run directory
            if not self._made_directory:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._made_directory = True
            self._wait(client)
            while len(self._pending) >= MAX_PENDING_WRITES:
                self._wait(next(iter(self._pending)))
            if self._writer is None:
                _file_mode()  # asked here, in the caller's thread, before the writer exists
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="client-state")
            path = self._path(client, generation)
            # serialized and written by the writer, which then deletes the stale file: the
            # caller only packs the state and never waits for the disk
            self._pending[client] = self._writer.submit(_write, path, packed, metadata, stale)
            self._index[client] = generation
        else:  # stateless clients (FedAvg and kin) cost no file at all
            self._index.pop(client, None)
            if stale is not None:
                stale.unlink(missing_ok=True)

    def _wait(self, client: int) -> None:
        write = self._pending.pop(client, None)
        if write is not None:
            write.result()  # raises the write's error, if any

    def flush(self) -> None:
        """Wait until every state file handed to `put` is on disk."""
        for client in list(self._pending):
            self._wait(client)

    def bytes_in_memory(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for state in self._memory.values()
            for tensors in state.values()
            for t in tensors.values()
        )

    def bytes_on_disk(self) -> int:
        if self.directory is None:
            return 0
        self.flush()
        return sum(p.stat().st_size for p in self.directory.glob("*.safetensors"))

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the states themselves (in memory) or the index (on disk)."""
        if self.directory is None:
            return {"client_states": self._memory}
        self.flush()  # an index names only files that are complete
        index = dict(self._index)
        self._kept = (self._kept + [index])[-2:]
        for client, generation in list(self._superseded):
            if not any(ix.get(client) == generation for ix in self._kept):
                self._path(client, generation).unlink(missing_ok=True)
                self._superseded.discard((client, generation))
        return {"client_state_dir": str(self.directory), "client_state_index": index}

    def load_state_dict(self, state: dict) -> None:
        if "client_state_index" in state:
            if self.directory is None:
                raise ValueError(
                    "this checkpoint keeps client states on disk; give the store a directory"
                )
            index = state["client_state_index"]
            if not isinstance(index, dict):
                raise ValueError("client_state_index: expected a mapping")
            self._index = {int(k): int(v) for k, v in index.items()}
            self._kept = [dict(self._index)]
            self._superseded = set()
            # files written after that checkpoint belong to rounds that will run again; only
            # this store's own files (<client>.<gen>.safetensors, regular files) are deleted
            for path in self.directory.glob("*.safetensors"):
                match = STATE_FILE.fullmatch(path.name)
                if match is None or path.is_symlink() or not path.is_file():
                    continue
                client, generation = int(match[1]), int(match[2])
                if self._index.get(client) != generation:
                    path.unlink(missing_ok=True)
            for path in self.directory.glob(".tmp*"):
                if (
                    UNFINISHED_FILE.fullmatch(path.name)
                    and not path.is_symlink()
                    and path.is_file()
                ):
                    path.unlink(missing_ok=True)
            return
        states = state.get("client_states", {})
        if self.directory is None:
            self._memory = dict(states)
        else:
            for client, s in states.items():
                self.put(int(client), s)

"""Saving and loading models and checkpoints without ever unpickling a file.

A pickled PyTorch file can run any code when it is loaded, and model files and checkpoints travel
between machines nobody controls. So every file fedpose writes is a safetensors file: raw tensor
bytes plus a JSON header, which `safetensors` alone can read and which can hold no code.

- Model files (`model.safetensors`): the state dict as tensors; the header metadata holds the
  format, its version, the resolved config (JSON) and the skeleton name, so
  `safetensors.safe_open(path, "pt").metadata()` tells any tool what built the weights.
- Checkpoints: a nested state (dicts, lists, tensors, numbers and a few named dataclasses) split
  into tensors and one JSON tree that names them. Each carries a format version, the run's
  identity (method, seed, config hash) and a SHA-256 of its tensor bytes, all checked on load.
  Writes are atomic and the previous good checkpoint is kept, so a damaged newest one falls back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpose.config import Config, ConfigError, config_from_dict
from fedpose.data import skeleton_named
from fedpose.data.records import Skeleton
from fedpose.model.pose_resnet import PoseResNet, build_model

MODEL_FILE = "model.safetensors"
MODEL_FORMAT = "fedpose-model"
CHECKPOINT_FORMAT = "fedpose-checkpoint"
FORMAT_VERSION = 1
# a safetensors header is JSON of tensor names, shapes and offsets: far below this for any model
_MAX_HEADER_BYTES = 100 * 2**20


class ModelFileError(ValueError):
    """A model or checkpoint file that is missing, damaged, hostile or of another run."""


# ----------------------------------------------------------------------------- raw file access
def _safetensors_framing(data: bytes) -> bool:
    """An 8-byte header length that fits the file, then a JSON object: checked before the pickle
    signatures, because a header length's low byte may itself be 0x80."""
    if len(data) < 9 or data[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return header_len <= len(data) - 8


def _refuse_pickle(path: Path, head: bytes) -> None:
    # zip archives (torch.save since 1.6) and raw pickles (protocol byte 0x80) may run code
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise ModelFileError(
            f"{path}: a pickled PyTorch file; fedpose never unpickles model or checkpoint files "
            f"because loading a pickle can run arbitrary code (fedpose writes .safetensors)"
        )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or ModelFileError saying what is wrong."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    data = path.read_bytes()
    if not _safetensors_framing(data):
        _refuse_pickle(path, data[:4])
    if len(data) < 8:
        raise ModelFileError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ModelFileError(
            f"{path}: not a safetensors file or truncated (header of "
            f"{header_len} bytes in a file of {len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: damaged safetensors file ({e})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: a safetensors file without fedpose metadata")
    return tensors, metadata


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _write_durable(path: Path, payload: bytes) -> Path:
    """Write `payload` beside `path` as `<name>.tmp`, flushed to disk; returns the temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write, flush, then rename: a kill mid-write leaves the old file as it was."""
    os.replace(_write_durable(path, payload), path)


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage (BatchNorm buffers, snapshots of one model)
    return {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}


# ----------------------------------------------------------------------------- model files
def save_model(
    path: str | Path, weights: dict[str, torch.Tensor], cfg: Config, skeleton: Skeleton
) -> None:
    """Write the file `fedpose eval` and `predict` read: weights + the config that built them."""
    tensors = _plain(weights)
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(cfg.to_dict()),
        "skeleton": skeleton.name,
        "sha256": _tensor_digest(tensors),
    }
    _write_atomic(Path(path), save_safetensors(tensors, metadata))


def load_model(path: str | Path) -> tuple[PoseResNet, Config, Skeleton]:
    """The model of a model file, ready for inference, with its config and skeleton."""
    weights, config, skeleton_name = read_model(path)
    try:
        cfg = config_from_dict(config)
    except ConfigError as e:
        raise ModelFileError(f"{path}: the model's config is invalid: {e}") from None
    skeleton = skeleton_named(skeleton_name)
    if skeleton is None:
        raise ModelFileError(f"{path}: unknown skeleton {skeleton_name!r}")
    model = build_model(cfg.model, skeleton.num_joints)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelFileError(
            f"{path}: the weights do not fit the model its config describes: "
            f"{str(e).splitlines()[0]}"
        ) from None
    model.eval()
    return model, cfg, skeleton


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(weights, config dict, skeleton name) of a model file written by `save_model`."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    _check_format(path, meta, MODEL_FORMAT)
    _check_digest(path, tensors, meta)
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: the model's config metadata is missing or damaged") from None
    if not isinstance(config, dict) or not isinstance(meta.get("skeleton"), str):
        raise ModelFileError(f"{path}: the model's config or skeleton metadata is malformed")
    return tensors, config, meta["skeleton"]


def _check_format(path: Path, meta: dict, expected: str) -> None:
    if meta.get("format") != expected:
        raise ModelFileError(f"{path}: format {meta.get('format')!r}, expected {expected!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path}: {expected} version {meta.get('format_version')!r}; this "
            f"fedpose reads version {FORMAT_VERSION}"
        )


def _check_digest(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if meta.get("sha256") != _tensor_digest(tensors):
        raise ModelFileError(f"{path}: damaged: the tensor data does not match its checksum")


# ----------------------------------------------------------------------------- nested state
def encode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able tree of `obj`; its tensors go into `tensors` under the names the tree holds.

    Dicts keep their key types (client ids are ints), dataclasses are stored by class name and
    rebuilt only from the classes the reader names, so a checkpoint can never choose what to
    construct.
    """
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"$tensor": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"$ndarray": name}
    if is_dataclass(obj) and not isinstance(obj, type):
        return {
            "$dataclass": type(obj).__name__,
            "fields": {f.name: encode_state(getattr(obj, f.name), tensors) for f in fields(obj)},
        }
    if isinstance(obj, dict):
        return {
            "$dict": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {"$tuple": [encode_state(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [encode_state(x, tensors) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], classes: dict[str, type]) -> Any:
    """Inverse of `encode_state`; only the dataclasses in `classes` can be rebuilt."""
    if isinstance(tree, list):
        return [decode_state(x, tensors, classes) for x in tree]
    if not isinstance(tree, dict):
        return tree
    if "$tensor" in tree:
        return tensors[tree["$tensor"]]
    if "$ndarray" in tree:
        return tensors[tree["$ndarray"]].numpy()
    if "$tuple" in tree:
        return tuple(decode_state(x, tensors, classes) for x in tree["$tuple"])
    if "$dict" in tree:
        out = {}
        for key, value in tree["$dict"]:
            key = decode_state(key, tensors, classes)
            out[tuple(key) if isinstance(key, list) else key] = decode_state(
                value, tensors, classes
            )
        return out
    if "$dataclass" in tree:
        cls = classes.get(tree["$dataclass"])
        if cls is None:
            raise ModelFileError(f"unexpected object {tree['$dataclass']!r} in a checkpoint")
        return cls(**{k: decode_state(v, tensors, classes) for k, v in tree["fields"].items()})
    raise ModelFileError(f"unexpected node {sorted(tree)[:3]} in a checkpoint")


# ----------------------------------------------------------------------------- checkpoints
ADDED_SETTINGS = (
    ("data", "val_fraction", 0.0),
    ("fed", "server_opt", "sgd"),
    ("fed", "server_momentum", 0.0),
    ("fed", "server_beta1", 0.9),
    ("fed", "server_beta2", 0.99),
    ("fed", "server_tau", 1e-3),
)


def config_hash(config: dict) -> str:
    """A hash of the settings a resumed run must share with the run that wrote the checkpoint.

    Left out: where the run lives (name, out_dir, data.root), how far it goes (fed.rounds,
    train.epochs) and how it is computed without changing the numbers (workers, device): those may
    change on resume.
    """
    settings = json.loads(json.dumps(config))
    for section, key in (
        ("data", "root"),
        ("data", "workers"),
        ("fed", "rounds"),
        ("train", "epochs"),
        ("train", "device"),
    ):
        settings.get(section, {}).pop(key, None)
    for key in ("name", "out_dir"):
        settings.pop(key, None)
    # settings added after runs were made, left out at their defaults: a run written before
    # they existed still resumes
    for section, key, default in ADDED_SETTINGS:
        if settings.get(section, {}).get(key, default) == default:
            settings.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(config: dict) -> dict[str, str]:
    """What a checkpoint must match to be resumed: method, seed and the config hash."""
    return {
        "method": str(config.get("fed", {}).get("method")),
        "seed": str(config.get("seed")),
        "config_hash": config_hash(config),
    }


def checkpoint_paths(directory: str | Path) -> tuple[Path, Path]:
    """(newest, previous) checkpoint files of a run's checkpoints/ folder."""
    directory = Path(directory)
    return directory / "last.safetensors", directory / "previous.safetensors"


def save_checkpoint(directory: str | Path, state: dict, identity: dict[str, str]) -> Path:
    """Write `state` as the newest checkpoint; the one it replaces becomes the previous one."""
    last, previous = checkpoint_paths(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(state, tensors)
    tensors = _plain(tensors)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(tree),
        "sha256": _tensor_digest(tensors),
        **identity,
    }
    payload = save_safetensors(tensors, metadata)
    tmp = _write_durable(last, payload)
    # a kill between these two renames leaves no `last`; the reader then takes `previous`
    if last.exists():
        os.replace(last, previous)
    os.replace(tmp, last)
    return last


def read_checkpoint(path: str | Path, classes: dict[str, type]) -> tuple[dict, dict[str, str]]:
    """(state, identity) of one checkpoint file, verified against its format and checksum."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    _check_format(path, meta, CHECKPOINT_FORMAT)
    _check_digest(path, tensors, meta)
    try:
        tree = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: the checkpoint's state is missing or damaged") from None
    try:
        state = decode_state(tree, tensors, classes)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: damaged checkpoint state ({e})") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: the checkpoint's state is not a mapping")
    identity = {k: meta.get(k, "") for k in ("method", "seed", "config_hash")}
    return state, identity


def load_checkpoint(
    directory: str | Path, classes: dict[str, type], identity: dict[str, str], force: bool = False
) -> tuple[dict | None, list[str]]:
    """The newest sound checkpoint of a run, and warnings about the ones passed over.

    Returns (None, warnings) when the run has no checkpoint yet. A checkpoint of another method,
    seed or config is an error unless `force`; a damaged newest one falls back to the previous.
    A pickled checkpoint from an older fedpose is refused, never loaded.
    """
    directory = Path(directory)
    legacy = directory / "last.pt"
    candidates = [p for p in checkpoint_paths(directory) if p.exists()]
    if not candidates:
        if legacy.exists():
            _refuse_pickle(legacy, legacy.read_bytes()[:4])
            raise ModelFileError(f"{legacy}: not a fedpose checkpoint")
        return None, []
    warnings: list[str] = []
    errors: list[ModelFileError] = []
    for path in candidates:
        try:
            state, found = read_checkpoint(path, classes)
        except ModelFileError as e:
            errors.append(e)
            warnings.append(f"{e}; trying the previous checkpoint")
            continue
        mismatch = [
            f"{k} {found.get(k)!r} (this run: {v!r})"
            for k, v in identity.items()
            if found.get(k) != v
        ]
        if mismatch and not force:
            raise ModelFileError(
                f"{path}: written by another run: {', '.join(mismatch)}; "
                f"use another run name, or --force to resume anyway"
            )
        if mismatch:
            warnings.append(f"{path}: resuming despite {', '.join(mismatch)} (--force)")
        return state, warnings
    if len(errors) == 1:
        raise errors[0]
    raise ModelFileError("; ".join(str(e) for e in errors))

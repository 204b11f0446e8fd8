"""Saving and loading models and checkpoints without ever unpickling a file.

A pickled PyTorch file can run any code when it is loaded, and model files and checkpoints travel
between machines nobody controls. So every file fedpose writes is a safetensors file: raw tensor
bytes plus a JSON header, which `safetensors` alone can read and which can hold no code.

- Model files (`model.safetensors`): the state dict as tensors; the header metadata holds the
  format, its version, the resolved config (JSON, paths relative) and the conventions of
  model/conventions.py (fedpose version and commit, joint names, bones, flip pairs, input size
  and normalisation, crop and decode rules), so `safetensors.safe_open(path, "pt").metadata()`
  tells any tool what built the weights and how to use them. `model_from_checkpoint` makes one
  from a run's checkpoint and config.json.
- Checkpoints: a nested state (dicts, lists, tensors, numbers and a few named dataclasses) split
  into tensors and one JSON tree that names them. Each carries a format version, the run's
  identity (method, seed, config hash) and a SHA-256 of its tensor bytes, all checked on load.
  Writes are atomic and the previous good checkpoint is kept, so a damaged newest one falls back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpose.bounded import ParseError, loads_json
from fedpose.config import Config, ConfigError, config_from_dict
from fedpose.data import DATASETS, skeleton_named
from fedpose.data.records import Skeleton
from fedpose.model.conventions import describe_model, portable_config
from fedpose.model.pose_resnet import PoseResNet, build_model
from fedpose.run_dir import write_file

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
        header = loads_json(data[8 : 8 + header_len], f"{path} [header]")
        tensors = load_safetensors(data)
    except ParseError as e:
        raise ModelFileError(f"damaged safetensors file: {e}") from None
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
    """Write `payload` beside `path` as `<name>.tmp`, flushed to disk; returns the temporary. A
    new file renamed into place: a link there is replaced, never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path.with_name(path.name + ".tmp"), payload, durable=True)


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
    """Write the file `fedpose eval` and `predict` read: weights + the config that built them
    (its paths relative to the working directory) + the conventions of model/conventions.py.
    Weights holding NaN or Inf are refused: a destroyed model is never written."""
    check_finite(path, weights)
    tensors = _plain(weights)
    metadata = {
        **describe_model(cfg, skeleton),
        "format": MODEL_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(portable_config(cfg.to_dict())),
        "skeleton": skeleton.name,
        "sha256": _tensor_digest(tensors),
    }
    _write_atomic(Path(path), save_safetensors(tensors, metadata))


def load_any_model(path: str | Path) -> tuple[PoseResNet, Config, Skeleton]:
    """`load_model` for a model file, `model_from_checkpoint` for a run's checkpoint (its
    config.json two folders up: RUN/checkpoints/last.safetensors)."""
    path = Path(path)
    _, meta = _read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        return load_model(path)
    weights, cfg, skeleton = model_from_checkpoint(path)
    return _built(path, weights, cfg, skeleton), cfg, skeleton


def model_from_checkpoint(
    path: str | Path, config_file: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], Config, Skeleton]:
    """(global weights, config, skeleton) of a run's checkpoint, for `save_model`.

    The config comes from `config_file` (default: the run's config.json beside checkpoints/);
    it must be the one the checkpoint was written under (same config hash), so weights are never
    paired with a config that builds another model or names another dataset.
    """
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    _check_format(path, meta, CHECKPOINT_FORMAT)
    _check_digest(path, tensors, meta)
    config_path = Path(config_file) if config_file else path.parent.parent / "config.json"
    try:
        values = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(
            f"{config_path}: no such file (the run's config.json; give it with --config)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ModelFileError(f"{config_path}: not a fedpose config")
    values.pop("runtime", None)  # what the run measured, not a setting
    if config_hash(values) != meta.get("config_hash"):
        raise ModelFileError(
            f"{config_path}: not the config {path} was written under (config hash "
            f"{config_hash(values)}, the checkpoint's {meta.get('config_hash')})"
        )
    try:
        cfg = config_from_dict(values)
    except ConfigError as e:
        raise ModelFileError(f"{config_path}: {e}") from None
    weights = _checkpoint_weights(path, tensors, meta)
    return weights, cfg, DATASETS[cfg.data.dataset].skeleton


def _checkpoint_weights(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict
) -> dict[str, torch.Tensor]:
    # only the "weights" entry is decoded: the rest (server or optimizer state) may hold
    # dataclasses of layers this module must not import, and a model needs none of it
    try:
        tree = json.loads(meta["state"])
        entries = dict((k, v) for k, v in tree["$dict"] if isinstance(k, str))
        weights = decode_state(entries["weights"], tensors, {})
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: the checkpoint holds no model weights") from None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise ModelFileError(f"{path}: the checkpoint's weights are not a state dict")
    return weights


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
    return _built(path, weights, cfg, skeleton), cfg, skeleton


def _built(
    path: Path | str, weights: dict[str, torch.Tensor], cfg: Config, skeleton: Skeleton
) -> PoseResNet:
    check_finite(path, weights)
    # sizes were checked against Config's limits (config_from_dict), before anything is built
    model = build_model(cfg.model, skeleton.num_joints)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelFileError(
            f"{path}: the weights do not fit the model its config describes: "
            f"{str(e).splitlines()[0]}"
        ) from None
    model.eval()
    return model


def check_finite(path: str | Path, weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or Inf: such a model predicts nothing, silently."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(
                f"{path}: tensor {name} holds NaN or Inf values; the model is destroyed and "
                f"fedpose does not use it"
            )


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(weights, config dict, skeleton name) of a model file written by `save_model`."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    _check_format(path, meta, MODEL_FORMAT)
    _check_digest(path, tensors, meta)
    try:
        config = loads_json(meta["config"], f"{path} [config]")
    except (KeyError, TypeError, ParseError):
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


# ----------------------------------------------------------------------------- checkpoint schema
def tensors_problem(
    key: str, value: Any, expected: Mapping[str, torch.Tensor], exact_names: bool = True
) -> str | None:
    """Why `value` is not a {name: tensor} of `expected`'s names, shapes and dtypes, or None."""
    if not isinstance(value, dict):
        return f"key {key!r}: expected a mapping of tensors, found {type(value).__name__}"
    if exact_names and set(value) != set(expected):
        missing = sorted(set(expected) - set(value))[:2]
        extra = sorted(map(str, set(value) - set(expected)))[:2]
        return (
            f"key {key!r}: tensor names differ from the model's (missing {missing}, extra {extra})"
        )
    for name, t in value.items():
        ref = expected.get(name)
        if not isinstance(t, torch.Tensor):
            return f"key {key!r} [{name}]: expected a tensor, found {type(t).__name__}"
        if ref is not None and (t.shape != ref.shape or t.dtype != ref.dtype):
            return (
                f"key {key!r} [{name}]: {tuple(t.shape)} {t.dtype}, expected "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
    return None


def field_problem(
    key: str, value: Any, kind: type | tuple[type, ...], low: float = 0
) -> str | None:
    """Why `value` is not of `kind` (numbers: finite and at least `low`), or None."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return f"key {key!r}: expected {'/'.join(k.__name__ for k in kinds)}, found a bool"
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        return f"key {key!r}: expected {names}, found {type(value).__name__}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < low:
            return f"key {key!r}: {value!r} is out of range (at least {low:g})"
    return None


# ----------------------------------------------------------------------------- checkpoints
ADDED_SETTINGS = (
    ("data", "val_fraction", 0.0),
    ("fed", "server_opt", "sgd"),
    ("fed", "server_momentum", 0.0),
    ("fed", "server_beta1", 0.9),
    ("fed", "server_beta2", 0.99),
    ("fed", "server_tau", 1e-3),
    ("fed", "dirichlet_min_size", 0),
)


def config_hash(config: dict) -> str:
    """A hash of the settings a resumed run must share with the run that wrote the checkpoint.

    Left out: where the run lives (name, out_dir, data.root and the per-split image folders,
    data.generate), what else it writes (track), how far it goes (fed.rounds, train.epochs) and
    how it is computed without changing the numbers (workers, device): those may change on
    resume.
    """
    settings = json.loads(json.dumps(config))
    for section, key in (
        ("data", "root"),
        ("data", "generate"),
        ("data", "train_root"),
        ("data", "test_root"),
        ("data", "workers"),
        ("fed", "rounds"),
        ("train", "epochs"),
        ("train", "device"),
    ):
        settings.get(section, {}).pop(key, None)
    for key in ("name", "out_dir", "track"):  # track: extra outputs, the same numbers
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
        tree = loads_json(meta["state"], f"{path} [state]")
    except (KeyError, TypeError, ParseError):
        raise ModelFileError(f"{path}: the checkpoint's state is missing or damaged") from None
    try:
        state = decode_state(tree, tensors, classes)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ModelFileError(f"{path}: damaged checkpoint state ({e!r})") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: the checkpoint's state is not a mapping")
    identity = {k: meta.get(k, "") for k in ("method", "seed", "config_hash")}
    return state, identity


def load_checkpoint(
    directory: str | Path,
    classes: dict[str, type],
    identity: dict[str, str],
    force: bool = False,
    schema: Callable[[dict], str | None] | None = None,
) -> tuple[dict | None, list[str]]:
    """The newest sound checkpoint of a run, and warnings about the ones passed over.

    Returns (None, warnings) when the run has no checkpoint yet. A checkpoint of another method,
    seed or config is an error unless `force`; a damaged newest one falls back to the previous.
    `schema(state)` names what is missing or of the wrong type (None when the state is
    sound): a state it refuses counts as damaged. A pickled checkpoint from an older fedpose is
    refused, never loaded.
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
            problem = schema(state) if schema is not None else None
            if problem:
                raise ModelFileError(f"{path}: malformed checkpoint state: {problem}")
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

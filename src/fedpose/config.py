"""Plain dataclass configuration, loaded from TOML with `section.key=value` overrides."""

from __future__ import annotations

import ast
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    dataset: str = "synth-arm"  # lsp | mpii | coco | synth-arm
    root: str = "data/synth-arm"  # image folder (lsp: the dataset folder)
    ann: str = ""  # mpii/coco: training annotation file (synth-arm: written beside the images)
    test_ann: str = ""  # mpii/coco: test annotation file
    headboxes: str = ""  # mpii: gt_valid.mat for PCKh
    lsp_labels: str = "pc"  # lsp: pc (joints.mat) or oc (joints_OC.mat)
    synth_n: int = 2060  # synth-arm: images generated when root does not exist yet
    synth_seed: int = 0
    synth_size: int = 128  # synth-arm: rendered image side in pixels
    test_fraction: float = 0.2  # synth-arm / coco without test_ann: held-out share
    input_size: int = 64  # network input side (square); heatmaps are a quarter of it
    sigma: float = 2.0  # Gaussian heatmap sigma in heatmap pixels
    augment: bool = True
    max_train: int = 0  # 0 = all records
    max_test: int = 0
    workers: int = 0  # DataLoader worker processes
    cache_mb: int = 1024  # decoded images kept in memory per process (0 = decode every time)


@dataclass
class ModelConfig:
    depth: int = 18  # ResNet backbone: 18 | 34 | 50 | 101 | 152
    width: int = 64  # stem width; 64 is the standard ResNet, smaller for quick CPU runs
    deconv_filters: int = 256
    deconv_layers: int = 3
    pretrained: str = ""  # local torchvision-format ResNet state dict


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 10  # centralized training
    eval_every: int = 1  # centralized training: evaluate every N epochs (and after the last)
    flip_test: bool = True
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False
    compile: bool = False  # torch.compile the model on CUDA
    threads: int = 0  # CPU intra-op threads; 0 = the cores divided among fedpose's processes


@dataclass
class FedConfig:
    # fedavg | fedprox | fedbn | feddyn | fedaw | fedgh | fedgh-noproj | fedgh-noaw
    # | fedavg-clip | median | trimmed-mean (robust aggregation, docs/privacy.md)
    method: str = "fedgh"
    rounds: int = 10
    num_clients: int = 4
    clients_per_round: int = 0  # 0 = all available
    local_epochs: int = 1
    local_steps: int = 0  # > 0: fixed number of local batches instead of epochs
    partition: str = "attribute"  # iid | attribute | dirichlet | quantity
    partition_attr: str = "view"  # attribute | dirichlet: view | pose | facing
    dirichlet_alpha: float = 0.5
    quantity_alpha: float = 0.5
    eval_every: int = 1
    checkpoint_every: int = 1
    server_lr: float = 1.0  # eta in w + eta * update
    # The heatmap loss is small (~5e-3), so are its gradients: larger mu / alpha pin the clients
    # to the global model (results/hparam_sweep.md)
    prox_mu: float = 1e-4
    dyn_alpha: float = 1e-4
    aw_alpha: float = 5.0
    gh_tau: float = 0.0  # cosine below which two updates conflict
    gh_variant: str = "pcgrad"  # pcgrad | symmetric
    gh_order: str = "random"  # random | index
    gh_per_layer: bool = False
    gh_rescale: bool = False
    gh_method: str = "gram"  # gram | direct
    clip_norm: float = 1.0  # fedavg-clip: largest L2 norm of one client update
    trim_ratio: float = 0.1  # trimmed-mean: share of values cut at each end, in [0, 0.5)
    # client-side differential privacy, Flower engine only (engine/flower_dp.py, docs/privacy.md)
    dp_epsilon: float = 0.0  # per-release epsilon of Flower's LocalDpMod; 0 = off
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # L2 norm each client update is clipped to before the noise
    # asynchronous (FedBuff-style) mode
    mode: str = "sync"  # sync | async
    concurrency: int = 4  # clients training at once in async mode
    buffer_size: int = 2  # M: aggregate once this many updates are buffered
    staleness_exponent: float = 0.5  # a in (1 + s)^-a
    # dynamic client selection
    selection: str = "random"  # random | deadline | utility
    deadline: float = 0.0  # seconds of simulated round time; 0 = no deadline
    utility_explore: float = 0.1  # share of picks spent exploring rarely seen clients
    # a target PCK for time-to-accuracy reports (0 = none)
    target_pck: float = 0.0


@dataclass
class SystemConfig:
    """Simulated system heterogeneity. Each per-client value is a constant, a list, or a
    log-normal spread around the given median: speed_spread = 10 draws speeds over a 10x range."""

    speed: float = 100.0  # samples per simulated second
    speed_spread: float = 1.0  # max/min ratio of client speeds (log-uniform between)
    bandwidth: float = 1e7  # bytes per simulated second
    bandwidth_spread: float = 1.0
    latency: float = 0.1  # seconds per message
    dropout: float = 0.0  # probability a selected client vanishes during a round
    availability: float = 1.0  # probability a client can be selected at all in a round
    speeds: list = field(default_factory=list)  # explicit per-client speeds, overrides the spread


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    pass


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    return bool(value)


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        return _coerce_bool(value, key)
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(current, list):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}") from None
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return str(value)


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; give {full}.<key>=value")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, current, full))


def parse_overrides(overrides: list[str]) -> dict:
    """['fed.rounds=3', 'name=x'] -> {'fed': {'rounds': '3'}, 'name': 'x'}"""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.strip()
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        _apply(cfg, values)
        if "name" not in values:
            cfg.name = path.stem
    _apply(cfg, parse_overrides(overrides or []))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides to an existing Config, in place; returns it."""
    _apply(cfg, parse_overrides(overrides))
    return cfg


def merge_dicts(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (parse_overrides' nesting)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, values)
    return cfg

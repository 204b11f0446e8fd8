"""Plain dataclass configuration, loaded from TOML with `section.key=value` overrides.

This module imports nothing of fedpose: every room reads its section from here. The names that
registries own (fed.method, data.dataset, fed.partition, fed.selection) are checked by those
registries, all at once by the run lifecycle's prepare step (engine/run.py: check_config)."""

from __future__ import annotations

import ast
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    dataset: str = "synth-arm"  # lsp | mpii | coco | synth-arm
    root: str = "data/synth-arm"  # image folder (lsp: the dataset folder)
    ann: str = ""  # mpii/coco: training annotation file (synth-arm: written beside the images)
    test_ann: str = ""  # mpii/coco: test annotation file
    # coco: the image folders of `ann` and `test_ann` when they differ (COCO's train2017/ and
    # val2017/, as the pose toolkits' per-split image prefixes); "" = root
    train_root: str = ""
    test_root: str = ""
    headboxes: str = ""  # mpii: gt_valid.mat for PCKh
    lsp_labels: str = "pc"  # lsp: pc (joints.mat) or oc (joints_OC.mat)
    synth_n: int = 2060  # synth-arm: images generated into root (with generate = true)
    synth_seed: int = 0
    synth_size: int = 128  # synth-arm: rendered image side in pixels
    # synth-arm: render the set into root when root holds none; false makes a missing set an
    # error, so a typo in root never fills a new folder (`fedpose data synth-arm` renders one)
    generate: bool = False
    test_fraction: float = 0.2  # synth-arm / coco without test_ann: held-out share
    # > 0: a validation split carved from every client's training records (this share of each,
    # seeded); clients train on the rest and the run is scored on it instead of the test split
    # (tuning; in-process engine)
    val_fraction: float = 0.0
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
    # centralized training on one client's share of the federated partition (fed.partition,
    # fed.num_clients, seed): the local-only lower bound; -1 = all data (the upper bound)
    client: int = -1


@dataclass
class FedConfig:
    # fedavg | fedprox | fedbn | feddyn | fedaw | fedgh | fedgh-noproj | fedgh-noaw | scaffold
    # | fedavgm | fedadam | fedyogi | fedadagrad (fedavg with a server optimiser, see server_opt)
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
    # 0: draw once, then give each empty client one record of the largest (fedpose's rule);
    # > 0: redraw until every client has at least this many records, as flwr-datasets'
    # DirichletPartitioner's min_partition_size (docs/algorithms.md, "Partitions")
    dirichlet_min_size: int = 0
    quantity_alpha: float = 0.5
    eval_every: int = 1
    checkpoint_every: int = 1
    server_lr: float = 1.0  # eta in w + eta * update (the server optimiser's learning rate)
    # server optimiser applied to every strategy's aggregate update (fl/strategies/server_opt.py):
    # sgd | adam | yogi | adagrad; sgd with server_momentum = 0 is the plain step w + eta * update.
    # fedavgm / fedadam / fedyogi / fedadagrad are fedavg with sgd+momentum / adam / yogi / adagrad.
    # adam, yogi and adagrad move every coordinate by about server_lr: use e.g. 1e-2, not 1.
    server_opt: str = "sgd"
    server_momentum: float = 0.0  # sgd: beta in m <- beta m + update (FedAvgM; fedavgm needs > 0)
    server_beta1: float = 0.9  # adam | yogi | adagrad: first-moment decay
    server_beta2: float = 0.99  # adam | yogi: second-moment decay
    server_tau: float = 1e-3  # adam | yogi | adagrad: the adaptivity floor in m / (sqrt(v) + tau)
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
    gh_layer_stats: bool = False  # log each tensor's conflict share and update norms (FedGH)
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
    # FedBuff steps by (1/M) sum s_k delta_k, so a stale buffer moves the model less; true divides
    # by the sum of the discounts instead (the discount then only reweights the buffer)
    staleness_renormalise: bool = False
    # dynamic client selection
    selection: str = "random"  # random | deadline | utility
    deadline: float = 0.0  # seconds of simulated round time; 0 = no deadline
    utility_explore: float = 0.1  # Oort's epsilon: share of picks exploring (>= 1 pick when > 0)
    utility_round_time: float = 0.0  # Oort's preferred round time T; 0 = median of the candidates
    utility_penalty: float = 2.0  # Oort's alpha in (T / t_k)^alpha for clients slower than T
    # a target PCK for time-to-accuracy reports (0 = none)
    target_pck: float = 0.0
    # failures: a round in which every selected client fails is run again this many times, then
    # the run stops with an error (async: the patience is 20 x num_clients x (1 + retries) arrivals)
    round_retries: int = 0
    # refuse an update whose L2 norm exceeds this multiple of the recent median norm (0 = off)
    max_norm_ratio: float = 100.0
    # secure aggregation (fl/secure.py, docs/security.md): the server never holds one client's
    # update; conflict-aware methods see CountSketches of width sketch_width keyed by a secret
    # the sites share (in-process: sketch_secret; Flower: each SuperNode's sketch-secret)
    secure: bool = False
    sketch_width: int = 16384
    sketch_secret: str = ""
    secagg_clip: float = 1.0  # Flower SecAgg+: values are clipped to ±this before quantisation
    secagg_threshold: float = 0.6  # SecAgg+: share of the key shares needed to unmask


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
    # fault injection for tests and drills: kinds among FAULT_KINDS, drawn per (round, client)
    faults: list = field(default_factory=list)  # e.g. ["exception", "nan"]
    fault_rate: float = 0.0  # probability that a dispatched client is faulty


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

    def validate(self) -> Config:
        """Check every type, range and fixed choice of the config's own values; ConfigError names
        the key, the value and what is allowed. Runs as the config is loaded, before anything is
        written. Names of registered things (strategies, datasets, partitions, selection
        policies) are for their registries to check (engine/run.py: check_config)."""
        for problem in _checks(self):
            if problem is not None:
                raise ConfigError(problem)
        return self


class ConfigError(ValueError):
    pass


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce(value: Any, current: Any, key: str) -> Any:
    """`value` as the type of the field's default. Strings (from `-c`) are parsed; other values
    (from TOML) must already have that type: no silent float -> int or bool -> int."""
    if isinstance(current, bool):
        return _coerce_bool(value, key)
    if isinstance(current, int):
        return _coerce_number(value, int, "an integer", key)
    if isinstance(current, float):
        return _coerce_number(value, float, "a number", key)
    if isinstance(current, list):
        return _coerce_list(value, key)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_number(value: Any, kind: type, expected: str, key: str) -> Any:
    # an int is a fine float (TOML `lr = 1`); a float is never silently an int, a bool never either
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, accepted) and not isinstance(value, bool):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _coerce_list(value: Any, key: str) -> list:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}") from None
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return list(value)


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
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {section} was given a value, so it has no keys"
                )
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(
                f"override {item!r}: {key.strip()} was given keys, so it is a section"
            )
        node[parts[-1]] = value.strip()
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            values = read_toml(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except ParseError as e:
            raise ConfigError(str(e)) from None
        _apply(cfg, values)
        if "name" not in values:
            cfg.name = path.stem
    _apply(cfg, parse_overrides(overrides or []))
    cfg.validate()
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides to an existing Config, in place, and validate it
    again; returns it."""
    _apply(cfg, parse_overrides(overrides))
    cfg.validate()
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


# Fields that name a place on disk, or how this machine computes. A model file's config never
# chooses where anything is read or written, nor how many processes or which device: these are
# reset to the defaults before its config is used (data_from_user)
PATH_FIELDS = {
    "data": ("root", "ann", "test_ann", "headboxes", "workers", "cache_mb"),
    "model": ("pretrained",),
    "train": ("device", "threads"),
}


def data_from_user(cfg: Config, overrides: list[str]) -> Config:
    """A model file's config with every PATH_FIELDS entry reset to the default, `overrides`
    (the command line's) applied, and data generation off: the data to evaluate on is the
    user's to name. A dataset other than synth-arm needs `data.root` from the overrides."""
    defaults = Config()
    for section, names in PATH_FIELDS.items():
        for name in list(names) + [
            f.name
            for f in fields(getattr(cfg, section))
            if f.name.endswith(("_root", "_ann"))
            and isinstance(getattr(cfg, section).__dict__[f.name], str)
        ]:
            setattr(getattr(cfg, section), name, getattr(getattr(defaults, section), name))
    cfg.name, cfg.out_dir = defaults.name, defaults.out_dir
    cfg.data.generate = False
    _apply(cfg, parse_overrides(overrides))
    given = parse_overrides(overrides).get("data", {})
    if cfg.data.dataset != "synth-arm" and not (isinstance(given, dict) and "root" in given):
        raise ConfigError(
            f"data.root: name the {cfg.data.dataset} data to use, e.g. -c data.root=PATH (and "
            f"data.ann / data.test_ann); the paths stored in a model file are never used"
        )
    cfg.data.generate = False
    cfg.validate()
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, values)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- validation
DEPTHS = (18, 34, 50, 101, 152)
OPTIMIZERS = ("adam", "sgd")
MODES = ("sync", "async")
GH_VARIANTS = ("pcgrad", "symmetric")
GH_ORDERS = ("random", "index")
GH_METHODS = ("gram", "direct")
LSP_LABELS = ("pc", "oc")
FAULT_KINDS = ("exception", "nan", "wrong_shape", "exploding_norm", "timeout")
# Sizes a config (also one stored in a model file) may ask for: far above any useful model, far
# below what would exhaust the memory before anything is checked (width 2**20 allocates TBs)
MAX_WIDTH = 512
MAX_DECONV_FILTERS = 4096
MAX_INPUT_SIZE = 2048
MAX_SYNTH_SIZE = 4096
MAX_SYNTH_N = 10_000_000
# a round that cannot succeed is tried at most this often before the run stops
MAX_ROUND_RETRIES = 100
# a run name is a relative path of plain parts, so the run stays inside out_dir
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+= -]*")


def choice_problem(key: str, value: Any, allowed: tuple) -> str | None:
    """None when `value` is one of `allowed`, else the message saying so (the registries use it
    for their names, so every unknown name reads the same)."""
    if value in allowed:
        return None
    return f"{key}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}"


_choice = choice_problem


def _range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """None when low <(=) value <(=) high and value is finite, else the message saying so."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return None
    if low is not None and high is not None:
        allowed = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"{'<' if high_open else '<='} {high:g}"
    else:
        allowed = "a finite number"
    return f"{key}: {value!r} is out of range; allowed: {allowed}"


def _run_name(name: str) -> str | None:
    parts = name.split("/")
    if name and all(_NAME_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        return None
    return (
        f"name: {name!r} is not a plain run name; use letters, digits, spaces and _ . + = - "
        f"(and / between such parts), so the run stays inside out_dir"
    )


def _checks(cfg: Config) -> Iterator[str | None]:
    d, m, t, f, s = cfg.data, cfg.model, cfg.train, cfg.fed, cfg.system
    yield _run_name(cfg.name)
    yield None if cfg.out_dir else "out_dir: must not be empty"
    yield _range("seed", cfg.seed, 0)

    yield None if d.root else "data.root: must not be empty"
    yield _choice("data.lsp_labels", d.lsp_labels, LSP_LABELS)
    yield _range("data.synth_seed", d.synth_seed, 0)
    yield _range("data.synth_n", d.synth_n, 1, MAX_SYNTH_N)
    yield _range("data.synth_size", d.synth_size, 16, MAX_SYNTH_SIZE)
    yield _range("data.test_fraction", d.test_fraction, 0, 1, low_open=True, high_open=True)
    yield _range("data.val_fraction", d.val_fraction, 0, 1, high_open=True)
    yield (
        None
        if 32 <= d.input_size <= MAX_INPUT_SIZE and d.input_size % 32 == 0
        else f"data.input_size: {d.input_size} is not allowed; use a multiple of 32 up to "
        f"{MAX_INPUT_SIZE} (the backbone divides it by 32, the heatmaps are a quarter of it)"
    )
    yield _range("data.sigma", d.sigma, 0, low_open=True)
    yield _range("data.max_train", d.max_train, 0)
    yield _range("data.max_test", d.max_test, 0)
    yield _range("data.workers", d.workers, 0)

    yield _choice("model.depth", m.depth, DEPTHS)
    yield _range("model.width", m.width, 1, MAX_WIDTH)
    yield _range("model.deconv_filters", m.deconv_filters, 1, MAX_DECONV_FILTERS)
    yield (
        None
        if m.deconv_layers == 3
        else f"model.deconv_layers: {m.deconv_layers} is not allowed; use 3 (three stride-2 "
        f"deconvolutions turn the backbone's 1/32 into heatmaps of 1/4 of the input)"
    )

    yield _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    yield _range("train.lr", t.lr, 0, low_open=True)
    yield _range("train.momentum", t.momentum, 0, 1, high_open=True)
    yield _range("train.weight_decay", t.weight_decay, 0)
    yield _range("train.batch_size", t.batch_size, 1)
    yield _range("train.epochs", t.epochs, 1)
    yield _range("train.eval_every", t.eval_every, 1)
    yield (
        None
        if -1 <= t.client < f.num_clients
        else f"train.client: {t.client} is not allowed; use -1 (all data) or a client index "
        f"0..{f.num_clients - 1} of fed.num_clients"
    )
    yield (
        None
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device)
        else f"train.device: {t.device!r} is not allowed; use auto, cpu, cuda, cuda:N or mps"
    )

    yield _range("fed.rounds", f.rounds, 1)
    yield _range("fed.num_clients", f.num_clients, 1)
    yield _range("fed.clients_per_round", f.clients_per_round, 0, f.num_clients)
    yield _range("fed.local_epochs", f.local_epochs, 1)
    yield _range("fed.local_steps", f.local_steps, 0)
    yield None if f.partition_attr else "fed.partition_attr: must not be empty"
    yield _range("fed.dirichlet_alpha", f.dirichlet_alpha, 0, low_open=True)
    yield _range("fed.dirichlet_min_size", f.dirichlet_min_size, 0)
    yield _range("fed.quantity_alpha", f.quantity_alpha, 0, low_open=True)
    yield _range("fed.eval_every", f.eval_every, 1)
    yield _range("fed.checkpoint_every", f.checkpoint_every, 1)
    yield _range("fed.server_lr", f.server_lr, 0, low_open=True)
    yield from _server_opt_checks(f)
    yield _range("fed.prox_mu", f.prox_mu, 0)
    yield _range("fed.dyn_alpha", f.dyn_alpha, 0)
    yield _range("fed.aw_alpha", f.aw_alpha, 0)
    yield _range("fed.clip_norm", f.clip_norm, 0, low_open=True)
    yield _range("fed.trim_ratio", f.trim_ratio, 0, 0.5, high_open=True)
    yield _range("fed.dp_epsilon", f.dp_epsilon, 0)
    yield _range("fed.dp_delta", f.dp_delta, 0, 1, high_open=True)
    yield _range("fed.dp_clip", f.dp_clip, 0, low_open=True)
    yield _range("fed.gh_tau", f.gh_tau, -1, 1)
    yield _choice("fed.gh_variant", f.gh_variant, GH_VARIANTS)
    yield _choice("fed.gh_order", f.gh_order, GH_ORDERS)
    yield _choice("fed.gh_method", f.gh_method, GH_METHODS)
    yield _choice("fed.mode", f.mode, MODES)
    yield _range("fed.concurrency", f.concurrency, 1)
    yield _range("fed.buffer_size", f.buffer_size, 1)
    yield _range("fed.staleness_exponent", f.staleness_exponent, 0)
    yield _range("fed.deadline", f.deadline, 0)
    yield _range("fed.utility_explore", f.utility_explore, 0, 1)
    yield _range("fed.target_pck", f.target_pck, 0, 100)
    yield _range("fed.round_retries", f.round_retries, 0, MAX_ROUND_RETRIES)
    yield _range("fed.max_norm_ratio", f.max_norm_ratio, 0)
    yield _range("fed.sketch_width", f.sketch_width, 1)
    yield _range("fed.secagg_clip", f.secagg_clip, 0, low_open=True)
    yield _range("fed.secagg_threshold", f.secagg_threshold, 0, 1, low_open=True)

    yield _range("system.speed", s.speed, 0, low_open=True)
    yield _range("system.speed_spread", s.speed_spread, 1)
    yield _range("system.bandwidth", s.bandwidth, 0, low_open=True)
    yield _range("system.bandwidth_spread", s.bandwidth_spread, 1)
    yield _range("system.latency", s.latency, 0)
    yield _range("system.dropout", s.dropout, 0, 1, high_open=True)
    yield _range("system.availability", s.availability, 0, 1, low_open=True)
    yield _speeds(s.speeds)
    for kind in s.faults:
        yield _choice("system.faults", kind, FAULT_KINDS)
    yield _range("system.fault_rate", s.fault_rate, 0, 1)


SERVER_OPTS = ("sgd", "adam", "yogi", "adagrad")
# FedAvg with a server optimiser: the optimiser each method name implies
SERVER_OPT_METHODS = {
    "fedavgm": "sgd",
    "fedadam": "adam",
    "fedyogi": "yogi",
    "fedadagrad": "adagrad",
}


def _server_opt_checks(f: FedConfig) -> Iterator[str | None]:
    yield _choice("fed.server_opt", f.server_opt, SERVER_OPTS)
    yield _range("fed.server_momentum", f.server_momentum, 0, 1, high_open=True)
    yield _range("fed.server_beta1", f.server_beta1, 0, 1, high_open=True)
    yield _range("fed.server_beta2", f.server_beta2, 0, 1, high_open=True)
    yield _range("fed.server_tau", f.server_tau, 0, low_open=True)
    implied = SERVER_OPT_METHODS.get(f.method)
    if implied is not None and f.server_opt not in ("sgd", implied):
        yield (
            f"fed.server_opt: {f.server_opt!r} contradicts fed.method {f.method!r} (FedAvg with "
            f"{implied}); use fed.method=fedavg with fed.server_opt={f.server_opt}"
        )
    if f.method == "fedavgm" and f.server_momentum <= 0:
        yield (
            "fed.server_momentum: fedavgm needs a momentum > 0 (e.g. fed.server_momentum=0.9); "
            "with 0 it is fedavg"
        )


def _speeds(speeds: list) -> str | None:
    # the count is checked against fed.num_clients when the federation is built
    for i, v in enumerate(speeds):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            return f"system.speeds[{i}]: {v!r} is out of range; allowed: a number > 0"
    return None


# ----------------------------------------------------------------------------- bounded reading
# The one way fedpose parses JSON and TOML from a file (fedpose.bounded is its public face; it
# lives here because the config, which reads TOML, imports nothing of fedpose). Python's `json`
# and `tomllib` parse nesting recursively, so a file of 100 000 `[` ends in a RecursionError (a
# traceback) instead of a message: the nesting is counted first, outside strings, and anything
# deeper than MAX_DEPTH is refused with a ValueError naming the source.
MAX_DEPTH = 64
# strings removed before counting brackets: a "[" inside a string is no nesting
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_TOML_STRING = re.compile(
    r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*', re.S
)
_BRACKET = re.compile(r"[\[\]{}]")
# a TOML dotted key (a.b.c = 1, [a.b.c]) nests one table per dot
_DOTTED = re.compile(r"(?:[A-Za-z0-9_-]*\s*\.\s*){" + str(MAX_DEPTH + 1) + ",}")


class ParseError(ValueError):
    """A JSON or TOML text that cannot be read: the message names its source."""


def nesting_depth(text: str, strings: re.Pattern[str] = _JSON_STRING) -> int:
    """The deepest bracket nesting of `text` outside strings (an upper bound for TOML)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(strings.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _check_depth(text: str, source: object, strings: re.Pattern[str]) -> None:
    # a quick bound first: only a text with many brackets can be too deep
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text, strings) > MAX_DEPTH:
        raise ParseError(f"{source}: nested deeper than {MAX_DEPTH} levels")


def loads_json(
    text: str | bytes,
    source: object,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """`json.loads(text)`, or ParseError naming `source` (a file, `file [line N]`, ...)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ParseError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    _check_depth(text, source, _JSON_STRING)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise ParseError(f"{source}: not valid JSON: {e}") from None
    except RecursionError:  # a backstop: the depth check should have caught it
        raise ParseError(f"{source}: nested too deeply") from None


def read_json(path: str | Path, object_pairs_hook=None) -> Any:
    """The JSON value of a file, or ParseError / OSError naming it."""
    path = Path(path)
    return loads_json(path.read_bytes(), path, object_pairs_hook)


def loads_toml(text: str, source: object) -> dict:
    """`tomllib.loads(text)`, or ParseError naming `source`."""
    _check_depth(text, source, _TOML_STRING)
    if text.count(".") > MAX_DEPTH and _DOTTED.search(_TOML_STRING.sub("", text)):
        raise ParseError(f"{source}: a dotted key nested deeper than {MAX_DEPTH} levels")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ParseError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise ParseError(f"{source}: nested too deeply") from None


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads_toml(text, path)

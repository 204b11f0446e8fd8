"""The two sides of a federated run, each built from the config.

The server side (`build_server_side`) is the seeded initial model, its parameter layout and the
strategy: no data, so a Flower ServerApp builds exactly what the in-process engine builds. The
client side (`build_client_side`) is the records, the partition and each client's dataset. A
`Federation` holds both in one process: the in-process engine and Flower's partition shortcut."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpose import seeding
from fedpose.config import Config, DataConfig
from fedpose.data import load_split
from fedpose.data.dataset import PoseDataset
from fedpose.data.image_cache import ImageCache
from fedpose.data.partition import partition
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.data.site import dataset_skeleton, evaluation_partition
from fedpose.engine.evaluate import evaluate_model
from fedpose.fl.params import ModelLayout, model_layout
from fedpose.fl.strategies import build_strategy
from fedpose.fl.strategies.base import Strategy
from fedpose.metrics.pck import pck_counts, score_counts
from fedpose.model.inference import load_weights, resolve_device
from fedpose.model.pose_resnet import PoseResNet, build_model, load_pretrained


@dataclass
class ServerSide:
    """The model every engine and every site starts from, its layout and the strategy."""

    skeleton: Skeleton
    model: PoseResNet
    layout: ModelLayout
    strategy: Strategy
    device: torch.device

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}


def build_server_side(cfg: Config, skeleton: Skeleton | None = None) -> ServerSide:
    """The server side of `cfg` (the dataset's registered skeleton unless given)."""
    skeleton = skeleton or dataset_skeleton(cfg.data.dataset)
    model, layout, strategy = build_model_and_strategy(cfg, skeleton)
    return ServerSide(skeleton, model, layout, strategy, resolve_device(cfg.train.device))


def build_model_and_strategy(
    cfg: Config, skeleton: Skeleton
) -> tuple[PoseResNet, ModelLayout, Strategy]:
    """The initial model (seeded: every engine and every site builds the same one), its
    parameter layout and the strategy; no data needed."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, skeleton.num_joints)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    strategy = build_strategy(cfg.fed, seed=cfg.seed)
    layout = model_layout(model, keep_bn_local=strategy.keep_bn_local)
    return model, layout, strategy


@dataclass
class ClientSide:
    """Every client's training records (its share of the partition) and the test split."""

    data: DataConfig
    seed: int
    skeleton: Skeleton
    train_records: list[PoseRecord]
    test_records: list[PoseRecord]
    parts: list[list[int]]
    image_cache: ImageCache | None = None  # decoded images, shared by every client's dataset
    _datasets: dict[int, PoseDataset] = field(default_factory=dict)
    # each client's records among test_records (None: the test split partitioned like the
    # training data); set when test_records is a validation split carved from the clients
    test_parts: list[list[int]] | None = None

    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def client_dataset(self, client: int) -> PoseDataset:
        if client not in self._datasets:
            records = [self.train_records[i] for i in self.parts[client]]
            d = self.data
            self._datasets[client] = PoseDataset(
                records,
                self.skeleton,
                d.input_size,
                d.sigma,
                train=d.augment,
                seed=self.seed,
                image_cache=self.image_cache,
            )
        return self._datasets[client]


def build_client_side(cfg: Config) -> ClientSide:
    """Load both splits and partition the training records (fed.partition, fed.num_clients)."""
    train_records, skeleton = load_split(cfg.data, "train")
    test_records, _ = load_split(cfg.data, "test")
    parts = partition(train_records, cfg.fed, cfg.seed)
    if len(parts) != cfg.fed.num_clients:
        raise ValueError(f"partition made {len(parts)} clients, config says {cfg.fed.num_clients}")
    test_parts = None
    if cfg.data.val_fraction > 0:
        parts, held_out = carve_validation(parts, cfg.data.val_fraction, cfg.seed)
        # the run is scored on the held-out training records, never on the test split
        test_records = [train_records[i] for part in held_out for i in part]
        test_parts, start = [], 0
        for part in held_out:
            test_parts.append(list(range(start, start + len(part))))
            start += len(part)
    return ClientSide(
        cfg.data,
        cfg.seed,
        skeleton,
        train_records,
        test_records,
        parts,
        image_cache=ImageCache(cfg.data.cache_mb << 20) if cfg.data.cache_mb > 0 else None,
        test_parts=test_parts,
    )


def carve_validation(
    parts: list[list[int]], fraction: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(training parts, validation parts): a seeded `fraction` of every client's records (at
    least one where the client has two or more) is held out; the same for every method, so
    tuning runs are paired like the test runs."""
    rng = seeding.stream(seed, seeding.VALIDATION)
    train, held_out = [], []
    for part in parts:
        order = [part[int(i)] for i in rng.permutation(len(part))]
        n = min(max(round(fraction * len(part)), 1), len(part) - 1) if len(part) > 1 else 0
        held_out.append(sorted(order[:n]))
        train.append(sorted(order[n:]))
    return train, held_out


@dataclass
class Federation:
    """Both sides in one process; its evaluation is central, on the whole test split."""

    cfg: Config
    server: ServerSide
    clients: ClientSide
    # a client's state by id (set by the in-process engine): FedBN's sites are also scored with
    # their own BatchNorm tensors
    client_state: Callable[[int], dict] | None = None
    _test_parts: list[list[int]] | None = None

    # the parts the in-process transport and Flower's partition shortcut use
    @property
    def skeleton(self) -> Skeleton:
        return self.server.skeleton

    @property
    def model(self) -> PoseResNet:
        return self.server.model

    @property
    def layout(self) -> ModelLayout:
        return self.server.layout

    @property
    def strategy(self) -> Strategy:
        return self.server.strategy

    @property
    def device(self) -> torch.device:
        return self.server.device

    @property
    def train_records(self) -> list[PoseRecord]:
        return self.clients.train_records

    @property
    def test_records(self) -> list[PoseRecord]:
        return self.clients.test_records

    @property
    def parts(self) -> list[list[int]]:
        return self.clients.parts

    @property
    def client_sizes(self) -> list[int]:
        return self.clients.client_sizes

    def client_dataset(self, client: int) -> PoseDataset:
        return self.clients.client_dataset(client)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return self.server.initial_weights()

    @property
    def test_parts(self) -> list[list[int]]:
        """Each client's own records among test_records: the test split partitioned like the
        training data (what a Flower site holds, data/site.py), or its validation share."""
        if self._test_parts is None:
            self._test_parts = self.clients.test_parts or evaluation_partition(
                self.test_records, self.cfg
            )
        return self._test_parts

    def _evaluate(self, weights: dict[str, torch.Tensor], records: list[PoseRecord]) -> dict:
        load_weights(self.model, weights)
        return evaluate_model(
            self.model,
            records,
            self.skeleton,
            self.device,
            input_size=self.cfg.data.input_size,
            flip_test=self.cfg.train.flip_test,
        )

    def evaluate(self, weights: dict[str, torch.Tensor]) -> dict:
        """The global model's PCK on the test split, as metrics.jsonl records it, and each
        site's PCK on its own test records (`site_pck`, from the same predictions; FedBN also
        with each site's own BatchNorm tensors, `site_pck_local_bn`)."""
        ev = self._evaluate(weights, self.test_records)
        out = {k: ev[k] for k in ("pck_mean", "pck_per_joint", "heatmap_acc")}
        sites: dict[str, float | None] = {}
        for k, idx in enumerate(self.test_parts):
            if idx:
                records = [self.test_records[i] for i in idx]
                counts = pck_counts(ev["preds"][idx], records, self.skeleton)
                sites[str(k)] = _finite(score_counts(*counts, self.skeleton).mean)
        out["site_pck"] = sites
        if self.strategy.keep_bn_local and self.client_state is not None:
            out["site_pck_local_bn"] = self._local_bn_scores(weights)
        return out

    def _local_bn_scores(self, weights: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Each site's PCK of the global model with the site's own BatchNorm tensors (FedBN's
        deployed model); sites that never trained are left out."""
        out: dict[str, float | None] = {}
        for k, idx in enumerate(self.test_parts):
            local = self.client_state(k).get("local") if self.client_state else None
            if idx and local:
                records = [self.test_records[i] for i in idx]
                out[str(k)] = _finite(self._evaluate({**weights, **local}, records)["pck_mean"])
        return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def build_federation(cfg: Config) -> Federation:
    """Both sides of `cfg`: the client side first, so that unreadable data fails before the
    model is built."""
    clients = build_client_side(cfg)
    return Federation(cfg, build_server_side(cfg, clients.skeleton), clients)

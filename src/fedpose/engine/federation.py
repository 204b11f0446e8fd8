"""Everything a federated run is made of, built from one Config: data, partition, model,
strategy. Both engines (in-process and Flower) build it the same way, so they run the same
federation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpose import seeding
from fedpose.config import Config
from fedpose.data import load_split
from fedpose.data.dataset import PoseDataset
from fedpose.data.image_cache import ImageCache
from fedpose.data.partition import partition
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.data.site import evaluation_partition
from fedpose.fl.params import ModelLayout, model_layout
from fedpose.fl.strategies import build_strategy
from fedpose.fl.strategies.base import Strategy
from fedpose.metrics.evaluate import evaluate_model
from fedpose.metrics.pck import pck_counts, score_counts
from fedpose.model.inference import load_weights, resolve_device
from fedpose.model.pose_resnet import PoseResNet, build_model, load_pretrained


@dataclass
class Federation:
    cfg: Config
    skeleton: Skeleton
    train_records: list[PoseRecord]
    test_records: list[PoseRecord]
    parts: list[list[int]]
    model: PoseResNet
    layout: ModelLayout
    strategy: Strategy
    device: torch.device
    _datasets: dict[int, PoseDataset] = field(default_factory=dict)
    image_cache: ImageCache | None = None  # decoded images, shared by every client's dataset
    # a client's state by id (set by the runner for the in-process engine): FedBN's sites are
    # also scored with their own BatchNorm tensors
    client_state: Callable[[int], dict] | None = None
    _test_parts: list[list[int]] | None = None

    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def client_dataset(self, client: int) -> PoseDataset:
        if client not in self._datasets:
            records = [self.train_records[i] for i in self.parts[client]]
            d = self.cfg.data
            self._datasets[client] = PoseDataset(
                records,
                self.skeleton,
                d.input_size,
                d.sigma,
                train=d.augment,
                seed=self.cfg.seed,
                image_cache=self.image_cache,
            )
        return self._datasets[client]

    @property
    def test_parts(self) -> list[list[int]]:
        """Each client's own test records: the test split partitioned like the training data
        (the records a Flower site holds, data/site.py)."""
        if self._test_parts is None:
            self._test_parts = evaluation_partition(self.test_records, self.cfg)
        return self._test_parts

    def evaluate(self, weights: dict[str, torch.Tensor]) -> dict:
        """The global model's PCK on the test split, as metrics.jsonl records it, and each
        site's PCK on its own test records (`site_pck`, from the same predictions; FedBN also
        with each site's own BatchNorm tensors, `site_pck_local_bn`)."""
        load_weights(self.model, weights)
        ev = evaluate_model(self.model, self.test_records, self.skeleton, self.cfg, self.device)
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
        deployed model); sites that never trained keep the global ones."""
        out: dict[str, float | None] = {}
        for k, idx in enumerate(self.test_parts):
            local = self.client_state(k).get("local") if self.client_state else None
            if not idx or not local:
                continue
            load_weights(self.model, {**weights, **local})
            records = [self.test_records[i] for i in idx]
            ev = evaluate_model(self.model, records, self.skeleton, self.cfg, self.device)
            out[str(k)] = _finite(ev["pck_mean"])
        return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def build_federation(cfg: Config) -> Federation:
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
    model, layout, strategy = build_model_and_strategy(cfg, skeleton)
    return Federation(
        cfg,
        skeleton,
        train_records,
        test_records,
        parts,
        model,
        layout,
        strategy,
        resolve_device(cfg.train.device),
        image_cache=ImageCache(cfg.data.cache_mb << 20) if cfg.data.cache_mb > 0 else None,
        _test_parts=test_parts,
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

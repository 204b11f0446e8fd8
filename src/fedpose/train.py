"""Centralized training: all data in one place. The upper bound federated runs are compared to.

It goes through the steps of the run lifecycle (engine/run.py) around its epoch loop: the config
checked once (check_config), the model of the server side (build_server_side: the same seeded
model as every federated run), the records, the checkpoint read before the run folder is
claimed (prepare_run_dir), a RunObserver that sees every epoch, the model file at the end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpose.bounded import loads_json
from fedpose.config import Config
from fedpose.data import load_split
from fedpose.data.dataset import PoseDataset, make_epochs_loader
from fedpose.data.image_cache import ImageCache
from fedpose.data.partition import partition
from fedpose.data.records import Skeleton
from fedpose.engine.evaluate import evaluate_model
from fedpose.engine.federation import build_server_side
from fedpose.engine.run import check_config, prepare_run_dir
from fedpose.fl.observer import RunObserver
from fedpose.model.io import (
    MODEL_FILE,
    ModelFileError,
    check_finite,
    field_problem,
    load_checkpoint,
    run_identity,
    save_checkpoint,
    save_model,
    tensors_problem,
)
from fedpose.model.optim import make_optimizer
from fedpose.model.train_step import TrainStep
from fedpose.run_dir import append_line, claim, read_regular, write_file

LOSS_READ_EVERY = 16  # training steps between reads of the loss (each read syncs a GPU)


def _training_records(cfg: Config) -> tuple[list, Skeleton, str]:
    """The train split, or one client's share of it (`train.client`), and a note saying which."""
    records, skeleton = load_split(cfg.data, "train")
    if cfg.train.client < 0:
        return records, skeleton, ""
    share = partition(records, cfg.fed, cfg.seed)[cfg.train.client]
    note = f" (client {cfg.train.client} of {cfg.fed.num_clients} only)"
    return [records[i] for i in share], skeleton, note


def train_centralized(
    cfg: Config,
    resume: bool = False,
    console: Console | None = None,
    force: bool = False,
    observer: RunObserver | None = None,
) -> dict:
    """Train on all data; `resume` continues from the run's checkpoint (`force`: even one written
    by another method, seed or config, or into a folder another command made).
    `observer.round_done(epoch, record)` sees every epoch."""
    check_config(cfg)
    # checked and locked for the whole run: links, another process, another command's folder
    with claim(cfg.run_dir, cfg.out_dir, "train", force=force):
        return _train_claimed(
            cfg, resume, console or Console(emoji=False), force, observer or RunObserver()
        )


def _checkpoint_schema(model: torch.nn.Module) -> Callable[[dict], str | None]:
    expected = model.state_dict()

    def problem(state: dict) -> str | None:
        for key in ("weights", "optimizer", "scheduler", "epoch"):
            if key not in state:
                return f"key {key!r} is missing"
        return (
            tensors_problem("weights", state["weights"], expected)
            or field_problem("optimizer", state["optimizer"], dict)
            or field_problem("scheduler", state["scheduler"], dict)
            or field_problem("epoch", state["epoch"], int)
        )

    return problem


def _resume(ckpt_dir, identity: dict, force: bool, objects: tuple, console: Console) -> dict | None:
    """Load the newest sound checkpoint into (model, optimizer, scheduler); its state or None."""
    model, optimizer, scheduler = objects
    state, warnings = load_checkpoint(
        ckpt_dir, {}, identity, force=force, schema=_checkpoint_schema(model)
    )
    for warning in warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False)
    if state is None:
        console.print("no checkpoint yet: starting over")
        return None
    model.load_state_dict(state["weights"])
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelFileError(
            f"{ckpt_dir}: the checkpoint's optimizer or scheduler state does not fit this run: "
            f"{e!r}"
        ) from None
    console.print(f"resumed at epoch {state['epoch']}")
    return state


def _drop_rows_after(metrics_path, epoch: int) -> None:
    """Keep the metrics rows of epochs up to `epoch`; torn or damaged lines go too."""
    keep = []
    for line in read_regular(metrics_path).decode(errors="replace").splitlines():
        try:
            row = loads_json(line, metrics_path)
        except ValueError:
            continue
        value = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value <= epoch:
            keep.append(line)
    write_file(metrics_path, "".join(line + "\n" for line in keep))


def _train_claimed(
    cfg: Config, resume: bool, console: Console, force: bool, observer: RunObserver
) -> dict:
    train_records, skeleton, only = _training_records(cfg)
    test_records, _ = load_split(cfg.data, "test")
    server = build_server_side(cfg, skeleton)
    device = server.device
    console.print(
        f"{cfg.data.dataset}: {len(train_records)} train{only}, {len(test_records)} test "
        f"records, {skeleton.num_joints} joints; device {device}"
    )
    model = server.model
    model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    step = TrainStep(
        model,
        optimizer,
        device,
        amp=cfg.train.amp,
        channels_last=cfg.train.channels_last,
        compile=cfg.train.compile,
        threads=cfg.train.threads,
        processes=1 + cfg.data.workers,
    )
    epochs = cfg.train.epochs
    # step decay late in training, as SimpleBaseline does
    milestones = sorted({max(1, int(epochs * 0.7)), max(1, int(epochs * 0.9))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    cache = ImageCache(cfg.data.cache_mb << 20) if cfg.data.cache_mb > 0 else None
    dataset = PoseDataset(
        train_records,
        skeleton,
        cfg.data.input_size,
        cfg.data.sigma,
        train=cfg.data.augment,
        seed=cfg.seed,
        image_cache=cache,
        normalize=device.type == "cpu",
    )

    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    identity = run_identity(cfg.to_dict())
    metrics_path = run_dir / "metrics.jsonl"
    objects = (model, optimizer, scheduler)
    state = _resume(ckpt_dir, identity, force, objects, console) if resume else None
    start = state["epoch"] if state is not None else 0
    prepare_run_dir(cfg, resume=state is not None, command="train")
    if state is not None:
        # rows written after the checkpoint (a kill between a row and its checkpoint) belong
        # to epochs that run again
        _drop_rows_after(metrics_path, start)

    # one loader for every epoch: its worker processes start once
    loader = make_epochs_loader(
        dataset,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epochs=range(start, epochs),
        workers=cfg.data.workers,
        # a trailing batch of one breaks BatchNorm in training mode
        drop_last=len(dataset) % cfg.train.batch_size == 1,
        pin_memory=device.type == "cuda",
    )
    per_epoch = loader.batch_sampler.batches_per_epoch()
    batches = iter(loader)
    record: dict = {}
    t_start = time.perf_counter()
    with Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,  # a log gets the plain line per epoch below instead
    ) as bar:
        task = bar.add_task("batches", total=None, epoch=start, info="")
        for epoch in range(start, epochs):
            model.train()
            bar.reset(task, total=per_epoch, epoch=epoch + 1, info="")
            t0 = time.perf_counter()
            total, n = 0.0, 0
            pending: list[tuple[torch.Tensor, int]] = []
            for i in range(per_epoch):
                batch = next(batches)
                pending.append((step(batch), len(batch["index"])))
                # reading a loss waits for the device: do it every few steps, not every step
                if len(pending) == LOSS_READ_EVERY or i + 1 == per_epoch:
                    for loss, size in pending:
                        total += float(loss) * size
                        n += size
                    bar.update(task, advance=len(pending), info=f"loss {total / n:.6f}")
                    pending = []
            scheduler.step()
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "train_loss": total / max(n, 1),
                "epoch_seconds": seconds,
                "img_per_s": n / seconds,
            }
            if (epoch + 1) % max(cfg.train.eval_every, 1) == 0 or epoch + 1 == epochs:
                ev = evaluate_model(
                    model,
                    test_records,
                    skeleton,
                    device,
                    input_size=cfg.data.input_size,
                    flip_test=cfg.train.flip_test,
                )
                record.update({k: ev[k] for k in ("pck_mean", "pck_per_joint", "heatmap_acc")})
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            # a diverged model is never logged, checkpointed or saved: the last good files stay
            check_finite(f"{run_dir}: epoch {epoch + 1}", weights)
            append_line(metrics_path, json.dumps(record))
            save_checkpoint(
                ckpt_dir,
                {
                    "weights": weights,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                },
                identity,
            )
            info = f"loss {record['train_loss']:.6f}"
            if "pck_mean" in record:
                info += f"  PCK {record['pck_mean']:.1f}%"
                bar.update(task, info=info)
            if not console.is_terminal:  # a bar would show in a log only at the end
                console.print(f"train epoch {epoch + 1}/{epochs}  {info}", highlight=False)
            observer.round_done(epoch + 1, record)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_model(run_dir / MODEL_FILE, weights, cfg, skeleton)
    record["wall_seconds"] = time.perf_counter() - t_start
    observer.finished(None)
    observer.closed()
    return record

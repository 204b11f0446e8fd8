"""`fedpose bench data`: can the data pipeline keep the model busy?

Measures, in one run, the training-sample pipeline alone (read, decode, crop, augment, heatmap
targets) in one process and through a DataLoader with N workers, and the model's training
throughput on synthetic tensors on the chosen device; their ratio says whether data would starve
training. Both sides are measured alternately, `repeats` times, and each keeps its best pass, so
load from other jobs on the machine hits both alike.

The pipeline is the one training uses: decoded images cached in memory (warmed before the
workers fork), uint8 images normalised on the device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.table import Table

from fedpose.config import DataConfig
from fedpose.data import load_split
from fedpose.data.dataset import PoseDataset, make_epochs_loader
from fedpose.data.image_cache import ImageCache
from fedpose.model.inference import resolve_device
from fedpose.model.pose_resnet import build_model
from fedpose.model.train_step import TrainStep, available_cores, set_cpu_threads
from fedpose.tools import ToolError
from fedpose.tools.machine import device_name, model_config, now, utc_stamp


@dataclass
class DataBenchOptions:
    dataset: str = "lsp"
    root: str = ""
    ann: str = ""
    input_size: int = 256
    workers: int = 0  # 0 = every available core
    batch_size: int = 32
    samples: int = 256  # per pipeline pass
    model: str = "pose_resnet50"
    model_batch: int = 32
    model_steps: int = 5
    device: str = "auto"
    compile: bool = False
    repeats: int = 2


def training_dataset(
    dataset: str, root: str, input_size: int, ann: str = "", normalize: bool = False
) -> PoseDataset:
    """The training split of a dataset as training reads it: augmented, with an image cache."""
    cfg = DataConfig(dataset=dataset, root=root, ann=ann, input_size=input_size)
    records, skeleton = load_split(cfg, "train")
    if not records:
        raise ToolError(f"{root}: no training records")
    return PoseDataset(
        records,
        skeleton,
        input_size,
        cfg.sigma,
        train=True,
        seed=0,
        image_cache=ImageCache(cfg.cache_mb << 20),
        normalize=normalize,
    )


def items_per_second(dataset: PoseDataset, indices: list[int]) -> float:
    t0 = time.perf_counter()
    for i in indices:
        dataset[i]
    return len(indices) / (time.perf_counter() - t0)


def loader_per_second(
    dataset: PoseDataset, workers: int, batch_size: int, samples: int, epoch: int
) -> float:
    """Samples/s a DataLoader delivers once running (worker start-up excluded: the first
    batch starts the clock), over as many epochs as `samples` needs."""
    per_epoch = max(len(dataset) // batch_size, 1)
    epochs = range(epoch, epoch + math.ceil((samples + batch_size) / (per_epoch * batch_size)))
    loader = make_epochs_loader(
        dataset, batch_size, shuffle=True, seed=0, epochs=epochs, workers=workers, drop_last=True
    )
    batches = iter(loader)
    next(batches)
    t0, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["index"])
        if n >= samples:
            break
    seconds = time.perf_counter() - t0
    return n / seconds if n else float("nan")


def synthetic_step(
    model_name: str,
    num_joints: int,
    input_size: int,
    batch_size: int,
    device: torch.device,
    compile: bool,
) -> tuple[TrainStep, dict]:
    """A training step for the named model and one synthetic batch already on the device."""
    torch.manual_seed(0)
    model = build_model(model_config(model_name), num_joints).to(device).train()
    on_cuda = device.type == "cuda"
    step = TrainStep(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device,
        amp=on_cuda,
        channels_last=on_cuda,
        compile=compile,
    )
    h = input_size // 4
    batch = {
        "image": torch.randn(batch_size, 3, input_size, input_size, device=device),
        "target": torch.rand(batch_size, num_joints, h, h, device=device),
        "target_weight": torch.ones(batch_size, num_joints, 1, device=device),
    }
    return step, batch


def steps_per_second(step: TrainStep, batch: dict, steps: int) -> float:
    """Images/s over `steps` steps (after the caller's warm-up)."""
    t0 = now(step.device)
    for _ in range(steps):
        step(batch)
    return steps * len(batch["image"]) / (now(step.device) - t0)


def bench_data(opts: DataBenchOptions, progress=None) -> dict:
    device = resolve_device(opts.device)
    workers = opts.workers or available_cores()
    set_cpu_threads(0)
    dataset = training_dataset(opts.dataset, opts.root, opts.input_size, opts.ann)
    n = min(opts.samples, len(dataset))
    indices = list(range(n))

    # the pipeline without the cache and with float32 images, as every epoch used to run
    plain = PoseDataset(
        dataset.records, dataset.skeleton, dataset.input_size, dataset.sigma, train=True, seed=0
    )
    uncached = items_per_second(plain, indices)
    cold = items_per_second(dataset, indices)  # first touch decodes every image
    dataset.warm_cache()
    step, batch = synthetic_step(
        opts.model,
        dataset.skeleton.num_joints,
        opts.input_size,
        opts.model_batch,
        device,
        opts.compile,
    )
    for _ in range(3 if opts.compile else 1):  # warm-up: allocator, cuDNN autotune, compile
        step(batch)
    best = {"per_worker": 0.0, "loader": 0.0, "model": 0.0}
    for r in range(opts.repeats):
        dataset.set_epoch(r + 1)
        best["per_worker"] = max(best["per_worker"], items_per_second(dataset, indices))
        best["loader"] = max(
            best["loader"],
            loader_per_second(
                dataset, workers, opts.batch_size, max(n, 4 * workers * opts.batch_size), r + 1
            ),
        )
        best["model"] = max(best["model"], steps_per_second(step, batch, opts.model_steps))
        if progress:
            progress(r + 1, opts.repeats)
    return {
        "dataset": opts.dataset,
        "records": len(dataset),
        "input_size": opts.input_size,
        "workers": workers,
        "per_worker_uncached": uncached,
        "per_worker_cold": cold,
        "per_worker": best["per_worker"],
        "loader": best["loader"],
        "model": opts.model,
        "model_batch": opts.model_batch,
        "model_img_s": best["model"],
        "ratio": best["loader"] / best["model"],
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "amp": step.amp,
        "compile": opts.compile and device.type == "cuda",
        "cache_mb": dataset.image_cache.bytes / 2**20 if dataset.image_cache else 0.0,
        "when": utc_stamp(),
        "torch": torch.__version__,
    }


def data_table(res: dict) -> tuple[Table, str]:
    """The figures of `bench_data` as a table, and a line on the machine."""
    table = Table(
        title=f"{res['dataset']} training pipeline at {res['input_size']}x"
        f"{res['input_size']} ({res['records']} records) vs {res['model']} "
        f"training on {res['device']}"
    )
    table.add_column("what")
    table.add_column("samples/s", justify="right")
    table.add_row(
        "pipeline, 1 process, no cache, float32 images", f"{res['per_worker_uncached']:.0f}"
    )
    table.add_row("pipeline, 1 process, first epoch (decoding)", f"{res['per_worker_cold']:.0f}")
    table.add_row("pipeline, 1 process, cached images", f"{res['per_worker']:.0f}")
    table.add_row(f"pipeline, DataLoader with {res['workers']} workers", f"{res['loader']:.0f}")
    table.add_row(
        f"{res['model']} training, synthetic batch {res['model_batch']}"
        f"{', bf16' if res['amp'] else ''}{', compiled' if res['compile'] else ''}",
        f"{res['model_img_s']:.1f}",
    )
    notes = (
        f"{res['device_name']}; {res['cpu_threads']} CPU threads for the model; "
        f"{res['cache_mb']:.0f} MB of decoded images cached; torch {res['torch']}; "
        f"{res['when']}"
    )
    return table, notes

"""`fedpose bench train`: training throughput with real data, its share of the device's bf16
peak, and FedGH's server step at paper scale on the same device.

Training: the training split read as training reads it (decoded-image cache, augmentation,
heatmap targets, DataLoader workers, uint8 images normalised on the device) feeding the shared
`TrainStep` (bf16 autocast + channels_last on CUDA, optionally torch.compile). The same step on
one synthetic batch already on the device runs in the same process, right after, so the gap
between the two figures is what data loading costs. FLOPs per image are counted once (forward
and backward, on the meta device); img/s x FLOPs / peak is the share of the dense bf16 peak.

FedGH: K client updates of P float32 parameters on the device, one server step of FedAvg and of
FedGH (Gram method), each the best of a few repeats after a warm-up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.table import Table

from fedpose.data.dataset import make_epochs_loader
from fedpose.model.inference import resolve_device
from fedpose.model.pose_resnet import build_model
from fedpose.model.train_step import TrainStep, available_cores, set_cpu_threads
from fedpose.tools import ToolError
from fedpose.tools.bench_data import steps_per_second, synthetic_step, training_dataset
from fedpose.tools.machine import (
    bf16_peak_tflops,
    device_name,
    model_config,
    now,
    synchronize,
    train_flops_per_image,
    utc_stamp,
)


@dataclass
class TrainBenchOptions:
    model: str = "pose_resnet50"
    input_size: int = 256
    device: str = "auto"
    dataset: str = "lsp"
    root: str = ""
    ann: str = ""
    batch_size: int = 64
    workers: int = 0  # 0 = all cores but one (the one driving the device)
    steps: int = 20
    warmup: int = 3
    compile: bool = False
    peak_tflops: float | None = None
    fedgh_clients: int = 100
    fedgh_params: int = 34_000_000  # 0 = skip the FedGH measurement
    fedgh_repeats: int = 3


def real_data_images_per_second(opts: TrainBenchOptions, device: torch.device) -> dict:
    workers = opts.workers or max(1, available_cores() - 1)
    dataset = training_dataset(opts.dataset, opts.root, opts.input_size, opts.ann)
    if len(dataset) < opts.batch_size:
        raise ToolError(
            f"{opts.root}: {len(dataset)} training records, fewer than one batch "
            f"of {opts.batch_size}"
        )
    torch.manual_seed(0)
    model = build_model(model_config(opts.model), dataset.skeleton.num_joints).to(device).train()
    on_cuda = device.type == "cuda"
    step = TrainStep(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device,
        amp=on_cuda,
        channels_last=on_cuda,
        compile=opts.compile,
    )
    warmup = opts.warmup * (3 if opts.compile and on_cuda else 1)
    total = warmup + opts.steps
    per_epoch = len(dataset) // opts.batch_size
    loader = make_epochs_loader(
        dataset,
        opts.batch_size,
        shuffle=True,
        seed=0,
        epochs=range(math.ceil(total / per_epoch)),
        workers=workers,
        drop_last=True,
        pin_memory=on_cuda,
    )
    images = 0
    t0 = 0.0
    for done, batch in enumerate(loader):
        if done == warmup:
            t0 = now(device)  # the clock starts with the loader's workers running
        if done >= total:
            break
        step(batch)
        if done >= warmup:
            images += len(batch["index"])
    seconds = now(device) - t0
    # the same step on one resident synthetic batch: the model's own speed, no data loading
    synthetic, batch = synthetic_step(
        opts.model,
        dataset.skeleton.num_joints,
        opts.input_size,
        opts.batch_size,
        device,
        opts.compile,
    )
    for _ in range(warmup):
        synthetic(batch)
    return {
        "real_img_s": images / seconds,
        "synthetic_img_s": steps_per_second(synthetic, batch, opts.steps),
        "workers": workers,
        "records": len(dataset),
        "num_joints": dataset.skeleton.num_joints,
        "amp": step.amp,
        "compiled": opts.compile and on_cuda,
    }


def fedgh_step_seconds(clients: int, params: int, device: torch.device, repeats: int = 3) -> dict:
    """Best-of-`repeats` seconds of one FedAvg and one FedGH server step on the device."""
    from fedpose.fl.strategies import FedAvg, FedGH
    from fedpose.fl.strategies.base import RoundInput

    gen = torch.Generator(device=device).manual_seed(0)
    deltas = torch.randn(clients, params, device=device, generator=gen)
    shared = torch.randn(params, device=device, generator=gen)
    # some updates agree and some conflict, as on non-IID clients
    strength = torch.linspace(-0.6, 1.0, clients, device=device)
    deltas.add_(strength[:, None] * shared[None, :])
    del shared
    counts = torch.linspace(50, 150, clients, dtype=torch.float64)
    out: dict = {}
    for name, strategy in (("fedavg", FedAvg()), ("fedgh", FedGH(method="gram"))):
        inputs = RoundInput(
            deltas=deltas,
            counts=counts,
            client_ids=list(range(clients)),
            num_clients=clients,
            slices=[("all", 0, params)],
        )
        try:
            best = float("inf")
            for r in range(repeats + 1):  # the first run warms up
                t0 = now(device)
                strategy.aggregate(inputs, strategy.initial_state())
                dt = now(device) - t0
                if r:
                    best = min(best, dt)
            out[name] = best
        except (RuntimeError, TypeError, ValueError) as e:
            out[name] = None
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
    # the Gram matrix alone as one float32 GEMM on the device: the floor of FedGH's extra cost
    best = float("inf")
    for r in range(repeats + 1):
        t0 = now(device)
        torch.mm(deltas, deltas.T)
        dt = now(device) - t0
        if r:
            best = min(best, dt)
    out["gram_gemm"] = best
    del deltas
    synchronize(device)
    return out


def bench_train(opts: TrainBenchOptions) -> dict:
    device = resolve_device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        # the loader's workers are busy processes too: the training process gets its share
        set_cpu_threads(0, processes=1 + (opts.workers or max(1, available_cores() - 1)))
    started = time.perf_counter()
    res = real_data_images_per_second(opts, device)
    flops = train_flops_per_image(model_config(opts.model), res["num_joints"], opts.input_size)
    peak = bf16_peak_tflops(device, opts.peak_tflops)
    res.update(
        model=opts.model,
        input_size=opts.input_size,
        batch_size=opts.batch_size,
        steps=opts.steps,
        device=str(device),
        device_name=device_name(device),
        train_gflop_per_image=flops / 1e9,
        peak_tflops=peak,
        real_tflops=res["real_img_s"] * flops / 1e12,
        real_share=(res["real_img_s"] * flops / 1e12 / peak) if peak else None,
        synthetic_share=(res["synthetic_img_s"] * flops / 1e12 / peak) if peak else None,
        cpu_threads=torch.get_num_threads(),
        when=utc_stamp(),
        torch=torch.__version__,
    )
    if opts.fedgh_params > 0:
        res["fedgh"] = fedgh_step_seconds(
            opts.fedgh_clients, opts.fedgh_params, device, opts.fedgh_repeats
        )
        res["fedgh"].update(clients=opts.fedgh_clients, params=opts.fedgh_params)
    res["seconds"] = time.perf_counter() - started
    return res


def train_tables(res: dict, dataset: str) -> tuple[Table, str]:
    """The figures of `bench_train` as a table, and lines on FLOPs, peak, machine and FedGH."""
    mode = ", ".join(
        x
        for x in (
            "bf16" if res["amp"] else "fp32",
            "channels_last" if res["amp"] else "",
            "torch.compile" if res["compiled"] else "",
        )
        if x
    )
    table = Table(
        title=f"{res['model']} training at {res['input_size']}x{res['input_size']}, "
        f"batch {res['batch_size']}, {res['device_name']} ({mode})"
    )
    table.add_column("input")
    table.add_column("img/s", justify="right")
    table.add_column("TFLOP/s", justify="right")
    table.add_column("share of bf16 peak", justify="right")

    def share(x: float | None) -> str:
        return "unknown" if x is None else f"{100 * x:.1f} %"

    tflop = res["train_gflop_per_image"] / 1e3
    table.add_row(
        f"{dataset}: {res['records']} records, {res['workers']} loader workers",
        f"{res['real_img_s']:.1f}",
        f"{res['real_img_s'] * tflop:.2f}",
        share(res["real_share"]),
    )
    table.add_row(
        "synthetic batch on the device",
        f"{res['synthetic_img_s']:.1f}",
        f"{res['synthetic_img_s'] * tflop:.2f}",
        share(res["synthetic_share"]),
    )
    peak = "unknown" if res["peak_tflops"] is None else f"{res['peak_tflops']:.0f} TFLOP/s"
    lines = [
        f"{res['train_gflop_per_image']:.1f} GFLOP per image per training step; bf16 peak "
        f"{peak}; {res['cpu_threads']} CPU threads; torch {res['torch']}; {res['when']}"
    ]
    fedgh = res.get("fedgh")
    if fedgh:
        for name in ("fedavg", "fedgh"):
            seconds = fedgh[name]
            shown = (
                f"{1e3 * seconds:.1f} ms"
                if seconds is not None
                else f"failed: {fedgh[name + '_error']}"
            )
            lines.append(
                f"{name} server step on {res['device']}, K = {fedgh['clients']}, "
                f"P = {fedgh['params']:,}: {shown}"
            )
        lines.append(
            f"Gram matrix alone as one float32 GEMM on {res['device']}: "
            f"{1e3 * fedgh['gram_gemm']:.1f} ms"
        )
    return table, "\n".join(lines)

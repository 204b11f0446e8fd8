"""What a benchmark needs to know about the machine it runs on: names, peaks, timing, models."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import torch

from fedpose.config import ModelConfig
from fedpose.provenance import cpu_model

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def cpu_name() -> str:
    """The CPU's model name, as every run's config.json records it."""
    return cpu_model()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def bf16_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, from `override` or the table; None when unknown (CPUs)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def model_config(name: str) -> ModelConfig:
    """`pose_resnet50` -> ModelConfig(depth=50): SimpleBaseline's names for its models."""
    match = re.fullmatch(r"pose_resnet(18|34|50|101|152)", name)
    if match is None:
        raise ValueError(f"unknown model {name!r}: use pose_resnet18|34|50|101|152")
    return ModelConfig(depth=int(match.group(1)))


def train_flops_per_image(model_cfg: ModelConfig, num_joints: int, input_size: int) -> float:
    """FLOPs of one training step per image (forward + backward), counted on the meta device,
    so nothing is computed and the count does not depend on the hardware."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedpose.model.pose_resnet import build_model

    with torch.device("meta"):
        # eval mode: BatchNorm in training mode refuses a batch of one at 1x1 resolution, and
        # the convolutions, which are all the FLOPs, cost the same in either mode
        model = build_model(model_cfg, num_joints).eval()
        x = torch.zeros(1, 3, input_size, input_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())

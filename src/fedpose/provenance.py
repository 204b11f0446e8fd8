"""What a run's numbers depend on besides its config: code version, thread count, Gram path.

A whole run is bit-reproducible only for the same code, CPU model and thread count (aggregation
alone is, on every machine), so every run directory records them beside the resolved config
(`config.json`, key "runtime"; the CPU model as /proc/cpuinfo's "model name", which `fedpose
report` uses to refuse pairing runs made on different CPUs).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from fedpose.fl.gram import gram_record


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout holding `path` (default: this package), '+dirty' if modified."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def gram_path() -> str:
    """How Gram matrices are computed (fl/gram.py): exact on a fixed-point grid, so the same
    bits on every BLAS, instruction set and thread count."""
    return gram_record(1)["path"]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) gives it, e.g. "AMD EPYC 7763 64-Core
    Processor"; the platform's processor or architecture name where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_info() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "gram_path": gram_path(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "commit": git_commit(),
    }

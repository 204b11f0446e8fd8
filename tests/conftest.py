"""Shared test fixtures. Real data lives in ../shared/datasets beside the project checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FEDPOSE_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"shared datasets not found at {DATASETS} (set FEDPOSE_DATASETS)")
    return DATASETS


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """48 synth-arm images at 64 px, generated once per test session."""
    from fedpose.data.synth_arm import generate_synth_arm

    out = tmp_path_factory.mktemp("synth-arm")
    generate_synth_arm(out, n=48, seed=0, size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation, and on a shared 2-core
    machine a busy core turns every op's barrier into a wait of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

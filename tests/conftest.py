"""Shared test fixtures.

The tests run from the repository alone: tests/data holds 40 LSP images with their joints in
LSP's own joints.mat format, and the MPII and COCO format fixtures (tests/data/README.md names
their sources and licences); synth-arm images are generated. Tests that need the whole of a
dataset (the 2000-image LSP) take the `datasets` fixture and are skipped unless the environment
variable FEDPOSE_DATASETS names a folder holding `lsp/` etc.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
DATASETS_VAR = "FEDPOSE_DATASETS"

# Subprocesses the tests start (Flower SuperLink/SuperNodes, data workers) inherit this; the
# in-process thread count is also set by `one_thread` below, in case torch was imported first.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The full datasets (FEDPOSE_DATASETS/lsp, ...): skipped when the variable is unset."""
    value = os.environ.get(DATASETS_VAR)
    if not value:
        pytest.skip(f"needs the full datasets: set {DATASETS_VAR} to a folder holding lsp/")
    path = Path(value)
    if not path.is_dir():
        # set but wrong is a broken setup, not an absent dataset: say so loudly
        pytest.fail(f"{DATASETS_VAR}={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def lsp_dir() -> Path:
    """40 LSP images, im0001-im0040, with joints.mat and joints_OC.mat cut to those columns."""
    return TEST_DATA / "lsp"


@pytest.fixture(scope="session")
def mpii_dir() -> Path:
    """5 MPII images and test_mpii.json (SimpleBaseline/HRNet JSON layout), no gt_valid.mat."""
    return TEST_DATA / "mpii"


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    """4 COCO val2017 images and test_coco.json (person_keypoints layout)."""
    return TEST_DATA / "coco"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """48 synth-arm images at 64 px, generated once per test session."""
    from fedpose.data.synth_arm import generate_synth_arm

    out = tmp_path_factory.mktemp("synth-arm")
    generate_synth_arm(out, n=48, seed=0, size=64, progress=False)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread. The test models are tiny: a second intra-op thread
    only adds synchronisation, and on a shared 2-core machine a busy core turns every op's
    barrier into a wait of milliseconds. A test that changes the count gets it reset after."""
    # imported here, not at the top: pytest-xdist's controller loads this file too, and torch's
    # few seconds of import would delay the start of every worker
    import torch

    torch.set_num_threads(1)
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# The files that take longest (seconds of test bodies on the 2-core machine, measured with
# `--durations=0`), handed out first. `make test` gives each worker whole files, in collection
# order (--dist loadfile --no-loadscope-reorder): a long file started last keeps one worker busy
# while the other idles; started first, the short files even out the end.
LONGEST_FILES = (
    "test_server.py",  # 11 s
    "test_flower_sites.py",  # 8.5 s
    "test_report.py",  # 8.5 s
    "test_failures.py",  # 4.5 s
    "test_hostile_model_files.py",  # 4 s
    "test_resume_safety.py",  # 4 s
    "test_flower_secure.py",  # 4 s
    "test_fuzz_inputs.py",  # 4 s
    "test_layout.py",  # 3 s
    "test_run_folder.py",  # 3 s
    "test_harmonize.py",  # 2.5 s
    "test_model_metadata.py",  # 2.5 s
    "test_partition.py",  # 2.5 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first, the rest in their usual order; tests keep their order within a
    file (a stable sort), which the fuzz module's final count relies on."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many tests were skipped and why, one line per reason, so that a run without
    FEDPOSE_DATASETS shows plainly what it did not cover."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = Counter(_skip_reason(report) for report in skipped)
    if not reasons:
        return
    terminalreporter.section("skipped tests, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count} skipped: {reason}")


def _skip_reason(report) -> str:
    # a skip's longrepr is (file, line, "Skipped: <reason>")
    if isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)

"""The README's "Using it" commands, followed in order after `make demo` as a newcomer would,
run and leave `make demo`'s results as they were.

The commands are read from the README and `make demo`'s from the Makefile; the test only
appends options that make each one tiny, and says why it skips the few it cannot run here."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import DATASETS_VAR
from test_docs import _blocks, _sections
from test_run_folder import _tree

from fedpose.cli import main

ROOT = Path(__file__).resolve().parents[1]
# every option of the config that the README's commands may set again comes last: the run is tiny
TINY_CONFIG = [
    "data.synth_n=48",
    "data.synth_size=64",
    "data.input_size=32",
    "data.max_train=24",
    "data.max_test=8",
    "model.width=4",
    "model.deconv_filters=8",
    "train.batch_size=8",
    "train.epochs=1",
    "train.flip_test=false",
    "fed.rounds=2",
    "fed.local_steps=1",
    "fed.eval_every=1",
]
TINY = {  # appended to the commands that begin with the key (argparse: the last value wins)
    ("compare",): ["--seeds", "0"],
    ("data", "synth-arm"): ["--n", "48", "--size", "64"],
    ("bench", "aggregate"): ["--clients", "4", "--params", "2000", "--repeats", "1"],
    ("bench", "data"): ["--input", "32", "--model", "pose_resnet18", "--samples", "8"],
    ("bench", "sim"): ["--clients", "8", "--per-round", "4", "--sizes", "8", "--rounds", "2"],
}
TINY_BENCH_DATA = ["--batch", "4", "--model-batch", "4", "--steps", "1", "--repeats", "1"]
SKIPPED = {  # commands this test cannot run, and why
    ("data", "download"): f"fetches LSP from the network ({DATASETS_VAR}'s lsp/ stands in)",
    ("bench", "train"): "asks for --device cuda",
    ("bench", "flower"): "starts Flower processes (tests/test_flower*.py run them)",
    ("flower-demo",): "starts Flower processes (tests/test_flower*.py run them)",
    ("flower-sim",): "starts Ray and Flower processes (tests/test_flower_sim.py runs it)",
}
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]+(\.\w+)?")  # IMAGES, PRED.json: the user's own file


def _readme_commands() -> list[list[str]]:
    """The fedpose command lines of the README's "Using it" block: continuation lines joined,
    comments dropped."""
    section = _sections(ROOT / "README.md")["Using it"]
    text = next(text for lang, text, _ in _blocks(section) if lang == "bash")
    lines = text.replace("\\\n", " ").splitlines()
    return [shlex.split(x, comments=True)[1:] for x in lines if x.startswith("fedpose ")]


def _make_demo() -> list[str]:
    """`make demo`'s fedpose command, from the Makefile."""
    recipe = re.search(
        r"^demo:.*\n\t\$\(BIN\)/fedpose (.+)$", (ROOT / "Makefile").read_text(), re.M
    )
    return shlex.split(recipe.group(1))


def _tiny(argv: list[str]) -> list[str]:
    extra = next((v for k, v in TINY.items() if tuple(argv[: len(k)]) == k), [])
    if argv[:2] == ["bench", "data"]:
        extra = extra + TINY_BENCH_DATA
    if any(a.endswith(".toml") for a in argv):
        extra = extra + [x for value in TINY_CONFIG for x in ("-c", value)]
    return argv + extra


def _why_skipped(argv: list[str], full_lsp: Path | None) -> str | None:
    for key, why in SKIPPED.items():
        if tuple(argv[: len(key)]) == key:
            return why
    if any(PLACEHOLDER.fullmatch(a.split("=")[-1]) for a in argv):
        return "names a file of the user's own"
    if full_lsp is None and any("lsp" in a for a in argv):
        return f"needs the whole of LSP (its train split): set {DATASETS_VAR}"
    return None


# worker processes (compare --jobs 2), about a minute of CPU in tiny runs; long: CI keeps within
# its 20 minutes without it, make test-slow runs it
@pytest.mark.slow
@pytest.mark.long
def test_the_readme_commands_in_order_leave_make_demos_results_intact(tmp_path, monkeypatch):
    full_lsp = Path(os.environ[DATASETS_VAR]) / "lsp" if os.environ.get(DATASETS_VAR) else None
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATASETS_VAR, raising=False)  # as on a fresh clone: data/ is the default
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "results").symlink_to(ROOT / "results")  # `fedpose family` reads its summaries
    if full_lsp is not None:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "lsp").symlink_to(full_lsp)  # where `data download lsp` puts it
    assert main(_tiny(_make_demo())) == 0
    demo = {"runs/demo": _tree(Path("runs/demo")), "data/synth-arm": _tree(Path("data/synth-arm"))}
    assert "report.md" in demo["runs/demo"]

    ran, skipped = [], []
    for argv in _readme_commands():
        why = _why_skipped(argv, full_lsp)
        if why:
            skipped.append((shlex.join(argv), why))
            continue
        assert main(_tiny(argv)) == 0, f"fedpose {shlex.join(argv)}"
        ran.append(argv)

    assert len(ran) >= (15 if full_lsp else 10), skipped
    for folder, before in demo.items():
        assert _tree(Path(folder)) == before, f"{folder} changed"
    # each command wrote where it said: its own folders beside runs/demo
    assert Path("runs/gh20/model.safetensors").is_file()
    assert Path("runs/ten-seeds/report.md").is_file()
    assert Path("runs/demo-report/report.md").is_file()
    assert Path("runs/demo-partition/partition.json").is_file()
    assert Path("runs/client0/model.safetensors").is_file()
    assert Path("runs/pred.png").is_file() and Path("runs/sites/site0/train.json").is_file()
    # and nowhere else: runs/ and data/ are what .gitignore leaves out of a clone's status
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "data", "results", "runs"]

"""docs/datasets.md and docs/extending.md work as written: their example files and commands are
run verbatim."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fedpose.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATASETS_DOC = ROOT / "docs" / "datasets.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_NAME = re.compile(r"`([^`]+)`:\s*$")


def _sections(doc: Path) -> dict[str, str]:
    parts = re.split(r"^## ", doc.read_text(), flags=re.M)
    return {part.splitlines()[0]: part for part in parts[1:]}


def _blocks(section: str) -> list[tuple[str, str, str]]:
    """(language, text, the prose line just before the fence) of every fenced block."""
    out = []
    for match in FENCE.finditer(section):
        before = section[: match.start()].rstrip("\n").splitlines()
        out.append((match.group(1), match.group(2), before[-1] if before else ""))
    return out


def _commands(section: str) -> list[list[str]]:
    """The fedpose command lines of a section's bash blocks, continuation lines joined."""
    lines = []
    for lang, text, _ in _blocks(section):
        if lang == "bash":
            joined = text.replace("\\\n", " ")
            lines += [shlex.split(x)[1:] for x in joined.splitlines() if x.startswith("fedpose ")]
    return lines


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, f"fedpose {shlex.join(argv)} exited {code}: {out.err}"
    return out.out


def test_own_data_example_inspects_and_partitions_by_site(tmp_path, monkeypatch, capsys):
    section = _sections(DATASETS_DOC)["Your own data as COCO JSON"]
    blocks = _blocks(section)
    annotations = next(text for lang, text, _ in blocks if lang == "json")
    # the prose names the JSON file; the config is the toml block that partitions by site
    ann_name = FILE_NAME.search(next(b for lang, _, b in blocks if lang == "json")).group(1)
    config = next(text for lang, text, _ in blocks if lang == "toml")
    monkeypatch.chdir(tmp_path)
    ann = Path(ann_name)
    ann.parent.mkdir(parents=True)
    ann.write_text(annotations)
    for image in json.loads(annotations)["images"]:
        path = ann.parent / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (image["width"], image["height"])).save(path)
    Path("my-poses.toml").write_text(config)

    commands = _commands(section)
    assert [c[:2] for c in commands] == [["data", "inspect"], ["data", "partition"]]
    inspected = _run(commands[0], capsys)
    assert re.search(r"records\s*│\s*2\s*│", inspected), inspected
    assert re.search(r"site\s*│\s*clinic-a: 1, clinic-b: 1", inspected), inspected
    _run(commands[1], capsys)
    partition = json.loads(Path("runs/my-poses/partition.json").read_text())
    assert "site" in json.dumps(partition)
    assert Path("runs/my-poses/partition.png").is_file()


def test_bundled_sample_commands_run_from_the_repository_root(tmp_path, monkeypatch, capsys):
    commands = _commands(_sections(DATASETS_DOC)["Trying the checks on the bundled samples"])
    assert len(commands) >= 4
    # a scratch folder that looks like the repository root, so generated data lands in tmp_path
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        _run(argv, capsys)


def test_lsp_extended_error_line_is_what_inspect_prints(tmp_path, monkeypatch, capsys):
    section = _sections(DATASETS_DOC)["LSP-extended"]
    quoted = next(text for lang, text, _ in _blocks(section) if text.startswith("error:"))
    monkeypatch.chdir(tmp_path)
    Path("data/lspet/images").mkdir(parents=True)
    scipy.io.savemat("data/lspet/joints.mat", {"joints": np.ones((14, 3, 10000))})
    assert main(["data", "inspect", "--dataset", "lsp", "--root", "data/lspet"]) == 2
    assert capsys.readouterr().err == quoted


@pytest.mark.parametrize(
    "name", ["LSP (Leeds Sports Pose)", "MPII Human Pose", "COCO person keypoints"]
)
def test_dataset_sections_show_an_inspect_command(name):
    commands = _commands(_sections(DATASETS_DOC)[name])
    assert any(c[:2] == ["data", "inspect"] for c in commands)


EXTENDING_DOC = ROOT / "docs" / "extending.md"


def _apply_registration(init: Path, snippets: list[str]) -> None:
    """The three edits of docs/extending.md step 2, placed where the page says."""
    import_line, names_start, branch = snippets
    text = init.read_text()
    lines = text.splitlines(keepends=True)
    last_import = max(i for i, x in enumerate(lines) if x.startswith("from fedpose.fl.strategies."))
    lines.insert(last_import + 1, import_line)
    text = "".join(lines)
    opening = names_start.splitlines()[0]
    assert text.count(opening) == 1, f"{init} has no single {opening!r}"
    text = text.replace(opening + "\n", names_start, 1)
    final_raise = text.index('    raise ValueError(f"unknown fed.method')
    init.write_text(text[:final_raise] + branch + text[final_raise:])


def _example_rule() -> tuple[str, str]:
    """(path, code) of the strategy file docs/extending.md writes."""
    rule = _blocks(_sections(EXTENDING_DOC)["1. The rule, in one file"])
    _, code, before = next(b for b in rule if b[0] == "python")
    return FILE_NAME.search(before).group(1), code


def test_extending_example_rule_is_fedavg_with_server_momentum():
    import torch

    from fedpose.fl.strategies.base import RoundInput

    _, code = _example_rule()
    namespace: dict = {}
    exec(compile(code, "fedavgm.py", "exec"), namespace)  # the page's file, as written
    rule = namespace["FedAvgM"](beta=0.5, server_lr=2.0)
    d1 = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])
    d2 = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 4.0]])
    counts = torch.tensor([1.0, 3.0], dtype=torch.float64)

    def inputs(deltas, add_to=None):
        return RoundInput(
            deltas=deltas,
            counts=counts,
            client_ids=[0, 1],
            num_clients=2,
            slices=[("w", 0, 3)],
            add_to=add_to,
        )

    first = rule.aggregate(inputs(d1), rule.initial_state())
    mean1 = 0.25 * d1[0] + 0.75 * d1[1]  # n_k / n = 1/4, 3/4
    torch.testing.assert_close(first.update, 2.0 * mean1)
    assert first.diagnostics["weights"] == [0.25, 0.75]
    weights = torch.ones(3)
    second = rule.aggregate(inputs(d2, add_to=weights), first.state)
    velocity = 0.5 * mean1 + (0.25 * d2[0] + 0.75 * d2[1])
    assert second.update is weights  # added in place, as the server asked
    torch.testing.assert_close(weights, 1.0 + 2.0 * velocity)
    torch.testing.assert_close(second.state["velocity"], velocity)


@pytest.mark.slow
def test_extending_example_runs_in_fedpose_compare(tmp_path):
    """SLOW (a fresh interpreter, about 10 s of CPU): the page's strategy file and registration,
    applied to a copy of the package, and its smoke command: the new rule trains and reports."""
    sections = _sections(EXTENDING_DOC)
    target, code = _example_rule()
    registration = [
        text for lang, text, _ in _blocks(sections["2. Registered by name"]) if lang == "python"
    ]
    assert len(registration) == 3
    smoke = _commands(sections["3. Run it"])[0]

    shutil.copytree(
        ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    (tmp_path / target).write_text(code)
    _apply_registration(tmp_path / "src/fedpose/fl/strategies/__init__.py", registration)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedpose.cli", *smoke],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run_dir = tmp_path / "runs" / "try-velocity"
    assert "fedavg-velocity" in (run_dir / "report.md").read_text()
    metrics = (run_dir / "fedavg-velocity-s0" / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in metrics.splitlines()]
    assert [r["method"] for r in rows] == ["fedavg-velocity", "fedavg-velocity"]
    assert all(r["velocity_norm"] > 0 for r in rows)
    # the copy, not the installed package, ran: the repository's own strategies are untouched
    assert "fedavg-velocity" not in (ROOT / "src/fedpose/fl/strategies/__init__.py").read_text()


def test_readme_library_names_exist():
    """The README's library section: its imports run and the functions it names exist (the
    snippet itself trains the demo, too long for a test)."""
    import importlib

    section = _sections(ROOT / "README.md")["Using fedpose as a library"]
    code = next(text for lang, text, _ in _blocks(section) if lang == "python")
    imports = [x for x in code.splitlines() if x.startswith(("from ", "import "))]
    assert len(imports) >= 3
    exec("\n".join(imports), {})
    named = re.findall(r"`(fedpose(?:\.\w+)+)\(", section)
    assert len(named) >= 2
    for dotted in named:
        module, _, name = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), dotted

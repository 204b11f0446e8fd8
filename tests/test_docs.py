"""docs/datasets.md and docs/extending.md work as written: their example files and commands are
run verbatim."""

from __future__ import annotations

import ast
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
    partition = json.loads(Path("runs/my-poses-partition/partition.json").read_text())
    assert "site" in json.dumps(partition)
    assert Path("runs/my-poses-partition/partition.png").is_file()


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


def _apply_registration(init: Path, snippets: list[str], package: str, table: str) -> None:
    """The two edits a registration section of docs/extending.md asks for, placed where it
    says: the import after the package's last loader import, the line first in the table."""
    import_line, entry = snippets
    text = init.read_text()
    lines = text.splitlines(keepends=True)
    last_import = max(
        node.end_lineno
        for node in ast.parse(text).body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package}.")
    )
    lines.insert(last_import, import_line)
    opening = [i for i, x in enumerate(lines) if x.startswith(f"{table}: dict[")]
    assert len(opening) == 1, f"{init} has no single {table} table"
    lines.insert(opening[0] + 1, entry)
    init.write_text("".join(lines))


def _registration(section: str) -> list[str]:
    """The import and the table line of a registration section (its first two python blocks;
    a further block shows an optional step)."""
    blocks = [
        text for lang, text, _ in _blocks(_sections(EXTENDING_DOC)[section]) if lang == "python"
    ]
    assert len(blocks) >= 2 and blocks[0].startswith("from fedpose."), blocks
    return blocks[:2]


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

    def inputs(deltas):
        return RoundInput(
            deltas=deltas,
            counts=counts,
            client_ids=[0, 1],
            num_clients=2,
            slices=[("w", 0, 3)],
        )

    first = rule.aggregate(inputs(d1), rule.initial_state())
    mean1 = 0.25 * d1[0] + 0.75 * d1[1]  # n_k / n = 1/4, 3/4
    torch.testing.assert_close(first.update, 2.0 * mean1)
    assert first.diagnostics["weights"] == [0.25, 0.75]
    second = rule.aggregate(inputs(d2), first.state)
    velocity = 0.5 * mean1 + (0.25 * d2[0] + 0.75 * d2[1])
    torch.testing.assert_close(second.update, 2.0 * velocity)
    torch.testing.assert_close(second.state["velocity"], velocity)


@pytest.mark.slow
def test_extending_example_runs_in_fedpose_compare(tmp_path):
    """SLOW (a fresh interpreter, about 10 s of CPU): the page's strategy file and registration,
    applied to a copy of the package, and its smoke command: the new rule trains and reports."""
    sections = _sections(EXTENDING_DOC)
    target, code = _example_rule()
    registration = _registration("2. Registered by name")
    smoke = _commands(sections["3. Run it"])[0]

    shutil.copytree(
        ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    (tmp_path / target).write_text(code)
    _apply_registration(
        tmp_path / "src/fedpose/fl/strategies/__init__.py",
        registration,
        "fedpose.fl.strategies",
        "STRATEGIES",
    )
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


def _example_dataset() -> tuple[str, str]:
    """(path, code) of the dataset loader docs/extending.md writes."""
    blocks = _blocks(_sections(EXTENDING_DOC)["A dataset in one file"])
    _, code, before = next(b for b in blocks if b[0] == "python")
    return FILE_NAME.search(before).group(1), code


def _write_arm_csv(folder: Path, synth_dir: Path) -> int:
    """labels.csv for the generated synth-arm images, in the page's columns; the row count."""
    from fedpose.config import DataConfig
    from fedpose.data import load_split

    data = DataConfig(dataset="synth-arm", root=str(synth_dir))
    folder.mkdir(parents=True)
    lines = ["image,split,x0,y0,x1,y1,x2,y2"]
    for split in ("train", "test"):
        for r in load_split(data, split)[0]:
            xy = ",".join(f"{v:.2f}" for v in r.joints.reshape(-1).tolist())
            lines.append(f"{os.path.relpath(r.image, folder)},{split},{xy}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def test_extending_example_dataset_loads_its_csv_and_names_bad_rows(tmp_path, synth_dir):
    _, code = _example_dataset()
    namespace: dict = {}
    exec(compile(code, "armcsv.py", "exec"), namespace)  # the page's file, as written
    rows = _write_arm_csv(tmp_path / "arm", synth_dir)
    from fedpose.config import DataConfig

    cfg = DataConfig(dataset="arm-csv", root=str(tmp_path / "arm"))
    train, skeleton = namespace["load_armcsv_split"](cfg, "train")
    test, _ = namespace["load_armcsv_split"](cfg, "test")
    assert skeleton.name == "arm-csv" and len(train) + len(test) == rows and test
    assert all(r.image.is_file() for r in train[:3])
    csv = tmp_path / "arm" / "labels.csv"
    csv.write_text(csv.read_text() + "images/x.png,train,1,2,3,four,5,6\n")
    with pytest.raises(Exception, match=f"labels.csv \\[record {rows + 1}\\]: needs numbers"):
        namespace["load_armcsv"](tmp_path / "arm")


@pytest.mark.slow
def test_extending_example_dataset_trains_and_inspects(tmp_path, synth_dir):
    """SLOW (a fresh interpreter, about 10 s of CPU): the page's loader file and its two
    registration lines, applied to a copy of the package, and its two commands."""
    target, code = _example_dataset()
    registration = _registration("A dataset registered by name")
    commands = _commands(_sections(EXTENDING_DOC)["A dataset: train on it"])
    assert [c[0] for c in commands] == ["run", "data"]

    shutil.copytree(
        ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    (tmp_path / target).write_text(code)
    _apply_registration(
        tmp_path / "src/fedpose/data/__init__.py", registration, "fedpose.data", "DATASETS"
    )
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    root = next(x.split("=", 1)[1] for x in commands[0] if x.startswith("data.root="))
    _write_arm_csv(tmp_path / root, synth_dir)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "1"}
    for argv in commands:
        done = subprocess.run(
            [sys.executable, "-m", "fedpose.cli", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run_dir = tmp_path / "runs" / "try-armcsv"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["pck_mean"] is not None
    model = subprocess.run(
        # eval reads the data the user names, never the model file's paths
        [
            sys.executable,
            "-m",
            "fedpose.cli",
            "eval",
            str(run_dir / "model.safetensors"),
            "-c",
            f"data.root={root}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert model.returncode == 0 and "arm-csv" in model.stdout, model.stdout + model.stderr
    # the copy, not the installed package, ran: the repository's own table is untouched
    assert "arm-csv" not in (ROOT / "src/fedpose/data/__init__.py").read_text()


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

"""docs/datasets.md works as written: its example files and commands are run verbatim."""

from __future__ import annotations

import json
import re
import shlex
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


@pytest.mark.parametrize("name", ["LSP (Leeds Sports Pose)", "MPII Human Pose",
                                  "COCO person keypoints"])
def test_dataset_sections_show_an_inspect_command(name):
    commands = _commands(_sections(DATASETS_DOC)[name])
    assert any(c[:2] == ["data", "inspect"] for c in commands)

"""The run folder is the run's alone: a planted link is refused before anything is read or
written through it, a second run of one name stops with one line, a killed run's lock never
blocks its resume, a start that cannot write keeps the previous run, and one command never
overwrites another command's folder unless forced."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fedtiny import tiny_cli_args

from fedpose.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as their target's text), for before/after checks."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = b"-> " + os.readlink(p).encode()
        elif p.is_file() and p.name != ".lock":
            out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_dir) -> Path:
    """One finished tiny FedDyn run (client states on disk), copied by each test."""
    out = tmp_path_factory.mktemp("finished") / "runs"
    args = tiny_cli_args(out, synth_dir, "fed.method=feddyn")
    assert main(["run", "configs/demo.toml", *args]) == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs, symlinks=True)
    return runs


def _outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_text("the user's own file\n")
    (folder / "0.0.safetensors").write_bytes(b"someone else's data")
    (folder / "1.7.safetensors").write_bytes(b"someone else's data")
    return folder


@pytest.mark.parametrize(
    ("planted", "resume"),
    [
        ("config.json", False),
        ("clients.json", False),
        ("metrics.jsonl", True),
        ("model.safetensors", False),
        ("checkpoints/client_state", True),
        (".", False),  # the run folder itself
    ],
)
def test_a_planted_link_is_refused_and_nothing_outside_changes(
    tmp_path, synth_dir, finished, capsys, planted, resume
):
    runs = _copy(finished, tmp_path)
    outside = _outside(tmp_path)
    run_dir = runs / "t"
    link = run_dir / planted if planted != "." else run_dir
    target = outside if planted in ("checkpoints/client_state", ".") else outside / "victim.txt"
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink()
    link.symlink_to(target)
    before = _tree(outside)
    capsys.readouterr()
    args = tiny_cli_args(runs, synth_dir, "fed.method=feddyn", "fed.rounds=2")
    assert main(["run", "configs/demo.toml", *args, *(["--resume"] if resume else [])]) == 2
    line = _one_error_line(capsys)
    assert "link" in line
    assert _tree(outside) == before


def test_a_second_run_of_one_name_stops_with_one_line(tmp_path, synth_dir, finished, capsys):
    from fedpose.run_dir import RunDirError, lock

    runs = _copy(finished, tmp_path)
    before = _tree(runs)
    held = lock(runs / "t")  # a run in progress in this very process
    try:
        args = tiny_cli_args(runs, synth_dir, "fed.method=feddyn")
        assert main(["run", "configs/demo.toml", *args]) == 2
        line = _one_error_line(capsys)
        assert f"in use by another fedpose process (pid {os.getpid()})" in line
        assert _tree(runs) == before
        with pytest.raises(RunDirError, match="in use"):
            lock(runs / "t")
    finally:
        held.release()
    lock(runs / "t").release()  # free again once the holder lets go


@pytest.mark.slow  # starts and SIGKILLs a process
def test_the_lock_of_a_killed_run_does_not_block_its_resume(tmp_path):
    from fedpose.run_dir import RunDirError, lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedpose.run_dir import lock; lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)",
            str(tmp_path / "run"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            lock(tmp_path / "run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel dropped the lock with its process; the stale pid in the file blocks nothing
    lock(tmp_path / "run").release()


def test_a_start_that_cannot_write_keeps_the_previous_run(tmp_path, synth_dir, finished, capsys):
    runs = _copy(finished, tmp_path)
    run_dir = runs / "t"
    (run_dir / "config.json").unlink()
    (run_dir / "config.json").mkdir()  # a folder where the run writes a file
    before = _tree(run_dir)
    assert {"metrics.jsonl", "model.safetensors", "checkpoints/last.safetensors"} <= set(before)
    capsys.readouterr()
    assert main(["run", "configs/demo.toml", *tiny_cli_args(runs, synth_dir)]) == 2
    assert "config.json: not a file" in _one_error_line(capsys)
    assert _tree(run_dir) == before


def test_one_command_never_overwrites_another_commands_folder(
    tmp_path, synth_dir, finished, capsys
):
    runs = _copy(finished, tmp_path)
    before = _tree(runs / "t")
    args = tiny_cli_args(runs, synth_dir, "train.epochs=1")
    capsys.readouterr()
    assert main(["train", "configs/demo.toml", *args]) == 2
    line = _one_error_line(capsys)
    assert "made by `fedpose run`" in line and "--name" in line
    assert _tree(runs / "t") == before
    # its own folder by --name; --force overwrites when that is what the user wants
    assert main(["train", "configs/demo.toml", *args, "--name", "t-train"]) == 0
    assert (runs / "t-train" / "model.safetensors").exists()
    assert (
        main(["run", "configs/demo.toml", *tiny_cli_args(runs, synth_dir), "--name", "t-train"])
        == 2
    )
    assert "made by `fedpose train`" in _one_error_line(capsys)
    assert main(["train", "configs/demo.toml", *args, "--force"]) == 0


def _unnamed(args: list[str]) -> list[str]:
    """tiny_cli_args without its `-c name=t`: the run takes the config's name (demo)."""
    pairs = [args[i : i + 2] for i in range(0, len(args), 2)]
    return [x for pair in pairs if pair[1] != "name=t" for x in pair]


def _comparison_folder(runs: Path) -> Path:
    """runs/demo as `make demo` leaves it: made by `fedpose compare`, a report and a run."""
    from fedpose.run_dir import mark

    folder = runs / "demo"
    shutil.copytree(runs / "t", folder / "fedgh-s0", symlinks=True)
    mark(folder, "compare")
    (folder / "report.md").write_text("# the comparison's report\n")
    return folder


def test_each_command_takes_its_own_folder_beside_another_commands(
    tmp_path, synth_dir, finished, capsys
):
    runs = _copy(finished, tmp_path)
    demo = _comparison_folder(runs)
    before = _tree(demo)
    args = _unnamed(tiny_cli_args(runs, synth_dir))
    capsys.readouterr()
    assert main(["run", "configs/demo.toml", *args]) == 0
    said = capsys.readouterr().out
    assert "holds the results of `fedpose compare`" in said and "demo-run" in said
    assert (runs / "demo-run" / "model.safetensors").is_file()
    # --resume finds the same folder: its one round goes on to two
    assert main(["run", "configs/demo.toml", *args, "-c", "fed.rounds=2", "--resume"]) == 0
    assert len((runs / "demo-run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", "configs/demo.toml", *args, "-c", "train.epochs=1"]) == 0
    assert (runs / "demo-train" / "model.safetensors").is_file()
    assert _tree(demo) == before
    # a name the user gives is theirs: another command's folder is refused, not replaced
    capsys.readouterr()
    assert main(["run", "configs/demo.toml", *args, "--name", "demo"]) == 2
    assert "made by `fedpose compare`" in _one_error_line(capsys)
    assert main(["train", "configs/demo.toml", *args, "-c", "name=demo-run"]) == 2
    assert "made by `fedpose run`" in _one_error_line(capsys)
    assert _tree(demo) == before


@pytest.mark.parametrize(
    ("made_by", "command", "expected"),
    [
        (None, "compare", "demo"),  # a new folder
        ("compare", "compare", "demo"),  # its own: --resume and reruns find it
        ("compare", "run", "demo-run"),
        ("compare", "train", "demo-train"),
        ("run", "compare", "demo-compare"),
    ],
)
def test_the_default_name_is_the_configs_unless_another_command_made_it(
    tmp_path, made_by, command, expected
):
    from fedpose.run_dir import default_name, mark

    if made_by:
        (tmp_path / "demo").mkdir()
        mark(tmp_path / "demo", made_by)
    assert default_name(tmp_path, "demo", command) == expected


def test_an_output_never_replaces_what_another_command_made(tmp_path, synth_dir, finished, capsys):
    runs = _copy(finished, tmp_path)
    demo = _comparison_folder(runs)
    before = _tree(runs)
    model = str(runs / "t" / "model.safetensors")
    ckpt = str(runs / "t" / "checkpoints" / "last.safetensors")
    refused = [
        ["report", str(runs / "t"), "--out", str(demo)],
        ["report", str(runs / "t"), "--out", str(demo / "report.md")],
        ["export", model, "--onnx", str(runs / "t" / "config.json")],
        ["predict", model, "image.png", "--out", str(runs / "t" / "clients.json")],
        ["model-from-checkpoint", ckpt, "--out", str(demo / "fedgh-s0" / "model.safetensors")],
        ["data", "split", "configs/demo.toml", str(demo)],
        ["data", "synth-arm", str(demo)],
        ["bench", "sim", "--workdir", str(runs / "t")],
    ]
    from fedpose.run_dir import RunDirError, check_output, output_folder

    capsys.readouterr()
    for argv in refused:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert "made by `fedpose" in line and "--force" in line, line
    assert _tree(runs) == before
    # a new folder of outputs becomes the command's own: its reruns may write there, others not

    output_folder(runs / "sites", "data split")
    output_folder(runs / "sites", "data split")
    args = tiny_cli_args(runs, synth_dir)
    assert main(["run", "configs/demo.toml", *args, "--name", "sites"]) == 2
    assert "made by `fedpose data split`" in _one_error_line(capsys)
    # --force is the user saying so (each command above passes its --force here)
    with pytest.raises(RunDirError, match="made by `fedpose compare`"):
        check_output(demo / "report.md", "report")
    check_output(demo / "report.md", "report", force=True)


def test_a_report_replaces_its_own_page_but_not_a_hand_written_one(tmp_path, finished, capsys):
    runs = _copy(finished, tmp_path)
    results = tmp_path / "results"  # a folder no command made, as the repository's results/
    results.mkdir()
    plan = results / "PLAN.md"
    plan.write_text("# The plan, written before the runs\n")
    capsys.readouterr()
    assert main(["report", str(runs / "t"), "--out", str(plan), "--no-figures"]) == 2
    line = _one_error_line(capsys)
    assert str(plan) in line and "did not write" in line and "--force" in line
    assert plan.read_text() == "# The plan, written before the runs\n"
    page = results / "t.md"
    for _ in range(2):  # its own page, rewritten
        assert main(["report", str(runs / "t"), "--out", str(page), "--no-figures"]) == 0
    assert main(["report", str(runs / "t"), "--out", str(plan), "--no-figures", "--force"]) == 0
    # a folder given as --out: its report.md is the page; a line quoted further down is no header
    pages = tmp_path / "pages"
    pages.mkdir()
    for folder, text in ((pages, "# hand-written\n"), (results, None)):
        page = folder / "report.md" if text else results / "quoting.md"
        page.write_text(text or "# Notes\n\n## Quoted\n\nReport made by: `fedpose report x`\n")
        out = folder if text else page
        capsys.readouterr()
        assert main(["report", str(runs / "t"), "--out", str(out), "--no-figures"]) == 2
        assert "did not write" in _one_error_line(capsys)
        assert page.read_text() == (text or page.read_text())

"""Nothing is lost: checkpoints are verified, a damaged newest one falls back to the previous
one, a run killed at any moment (also inside a checkpoint write) resumes bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fedtiny import tiny_cli_args, tiny_config
from rich.console import Console
from safetensors.torch import load_file

from fedpose.cli import main
from fedpose.engine.runner import run_federation
from fedpose.model.io import ModelFileError

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"wall_seconds", "agg_seconds"}


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- in process
@pytest.mark.usefixtures("one_thread")
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, synth_dir):
    whole = run_federation(tiny_config(tmp_path, synth_dir, "name=whole", "fed.rounds=3"))
    cfg = tiny_config(tmp_path, synth_dir, "name=cut", "fed.rounds=2")
    run_federation(cfg)
    last = cfg.run_dir / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:-100])  # a torn write the rename never hid
    with (cfg.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "trunc')  # a line a kill cut short
    console = Console(record=True, width=400)
    resumed = run_federation(
        tiny_config(tmp_path, synth_dir, "name=cut", "fed.rounds=3"), resume=True, console=console
    )
    out = console.export_text()
    assert "warning: " in out and "last.safetensors: damaged" in out
    assert "resumed cut at round 1" in out
    _same_weights(resumed.weights, whole.weights)
    assert _rows(cfg.run_dir) == _rows(tmp_path / "runs" / "whole")


def test_checkpoint_of_another_run_is_an_error_unless_forced(tmp_path, synth_dir, capsys):
    args = tiny_cli_args(tmp_path / "runs", synth_dir)
    assert main(["run", "configs/demo.toml", *args]) == 0
    capsys.readouterr()
    for other in (["-c", "seed=5"], ["-c", "fed.method=fedavg"], ["-c", "train.lr=0.5"]):
        assert (
            main(["run", "configs/demo.toml", *args, *other, "-c", "fed.rounds=2", "--resume"]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "written by another run" in err[0] and "--force" in err[0]
    assert (
        main(
            [
                "run",
                "configs/demo.toml",
                *args,
                "-c",
                "seed=5",
                "-c",
                "fed.rounds=2",
                "--resume",
                "--force",
            ]
        )
        == 0
    )
    assert "resuming despite seed '0'" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_resume_without_a_checkpoint_starts_over(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir)
    server = run_federation(cfg, resume=True)
    assert server.state.round == cfg.fed.rounds


@pytest.mark.usefixtures("one_thread")
def test_damaged_checkpoints_both_are_an_error(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir)
    run_federation(cfg)
    for path in (cfg.run_dir / "checkpoints").iterdir():
        path.write_bytes(b"\x00" * 5)
    with pytest.raises(ModelFileError, match="last.safetensors.*previous.safetensors"):
        run_federation(cfg, resume=True)


# ----------------------------------------------------------------------------- killed processes
KILLER = textwrap.dedent('''
    """Runs the fedpose CLI, and SIGKILLs itself inside the Nth checkpoint write."""
    import os, signal, sys
    import fedpose.model.io as io

    target, mode = int(os.environ["KILL_AT_WRITE"]), os.environ["KILL_MODE"]
    count = 0
    original = io._write_durable

    def write(path, payload):
        global count
        if path.name == "last.safetensors":
            count += 1
            if count == target:
                if mode == "partial":  # half the bytes reached the temporary file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.with_name(path.name + ".tmp").write_bytes(payload[: len(payload) // 2])
                else:
                    original(path, payload)
                    if mode == "between":  # the old checkpoint moved aside, the new not yet in
                        os.replace(path, path.with_name("previous.safetensors"))
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, payload)

    io._write_durable = write
    from fedpose.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _run(
    args: list[str], tmp_path: Path, env: dict | None = None, kill_after: float | None = None
) -> int:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "KILL_AT_WRITE": "0",
        "KILL_MODE": "none",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert b"Traceback" not in err and b"error:" not in err, err.decode()
    return proc.returncode


@pytest.mark.slow  # ~8 fedpose processes per mode: minutes on a busy 2-core machine
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path, synth_dir, mode
):
    def args(name: str) -> list[str]:
        return [
            "run",
            "configs/demo.toml",
            "-c",
            f"out_dir={tmp_path / 'runs'}",
            "-c",
            f"name={name}",
            "-c",
            f"data.root={synth_dir}",
            "-c",
            "data.input_size=32",
            "-c",
            "model.width=4",
            "-c",
            "model.deconv_filters=8",
            "-c",
            "train.batch_size=8",
            "-c",
            "train.flip_test=false",
            "-c",
            "fed.rounds=6",
            "-c",
            "fed.local_steps=2",
            "-c",
            "fed.num_clients=4",
            "-c",
            f"fed.mode={mode}",
            "-c",
            "fed.method=fedgh",
            "-c",
            "fed.eval_every=3",
        ]

    assert _run(args("whole"), tmp_path) == 0
    killed = -signal.SIGKILL
    # inside the first checkpoint write: no checkpoint yet, so the resume starts over
    assert _run(args("cut"), tmp_path, {"KILL_AT_WRITE": "1", "KILL_MODE": "partial"}) == killed
    assert not (tmp_path / "runs" / "cut" / "checkpoints" / "last.safetensors").exists()
    # the new checkpoint written to its temporary file, not yet renamed
    assert (
        _run([*args("cut"), "--resume"], tmp_path, {"KILL_AT_WRITE": "3", "KILL_MODE": "full"})
        == killed
    )
    # between moving the old checkpoint aside and renaming the new one into place
    assert (
        _run([*args("cut"), "--resume"], tmp_path, {"KILL_AT_WRITE": "2", "KILL_MODE": "between"})
        == killed
    )
    # at random moments
    rng = random.Random(10)
    for _ in range(2):
        _run([*args("cut"), "--resume"], tmp_path, kill_after=rng.uniform(2.0, 8.0))
    assert _run([*args("cut"), "--resume"], tmp_path) == 0

    whole, cut = tmp_path / "runs" / "whole", tmp_path / "runs" / "cut"
    _same_weights(
        load_file(str(cut / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    )
    assert _rows(cut) == _rows(whole)


@pytest.mark.slow  # two trainings and a resume: make test-slow
def test_centralized_training_resumes_from_its_checkpoint(tmp_path, synth_dir, capsys):
    def args(name: str, epochs: int) -> list[str]:
        return [
            "train",
            "configs/demo.toml",
            "-c",
            f"out_dir={tmp_path}",
            "-c",
            f"name={name}",
            "-c",
            f"data.root={synth_dir}",
            "-c",
            "data.input_size=32",
            "-c",
            "model.width=4",
            "-c",
            "model.deconv_filters=8",
            "-c",
            "train.batch_size=8",
            "-c",
            "train.flip_test=false",
            "-c",
            f"train.epochs={epochs}",
        ]

    assert main(args("whole", 2)) == 0
    assert main(args("cut", 1)) == 0
    assert main([*args("cut", 2), "--resume"]) == 0
    assert "resumed at epoch 1" in capsys.readouterr().out
    _same_weights(
        load_file(str(tmp_path / "cut" / "model.safetensors")),
        load_file(str(tmp_path / "whole" / "model.safetensors")),
    )

"""Model files, checkpoints and pretrained weights never run code: a hostile pickle is refused
with one `error:` line and its payload never executes; fedpose's own files are safetensors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedpose.cli import main

TINY = [
    "-c",
    "name=t",
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
    "fed.rounds=1",
    "-c",
    "fed.local_steps=1",
    "-c",
    "fed.num_clients=2",
    "-c",
    "train.epochs=1",
]


class Payload:
    """Unpickling this object creates the marker file: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path, zipped: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": "fedpose-model-v1", "weights": Payload(marker), "config": {}}
    if zipped:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error:"), err
    return err[0]


def _args(tmp_path: Path, synth_dir: Path) -> list[str]:
    return [*TINY, "-c", f"out_dir={tmp_path / 'runs'}", "-c", f"data.root={synth_dir}"]


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_pickled_model_file_is_refused_and_never_runs(tmp_path, synth_dir, capsys, zipped, command):
    marker = tmp_path / "payload-ran"
    model = _plant(tmp_path / "model.pt", marker, zipped)
    image = sorted((synth_dir / "images").iterdir())[0]
    argv = (
        ["eval", str(model)]
        if command == "eval"
        else ["predict", str(model), str(image), "--out", str(tmp_path / "p.png")]
    )
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "model.pt" in line and "pickle" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["last.pt", "last.safetensors", "previous.safetensors"])
@pytest.mark.parametrize("command", ["run", "train"])
def test_pickled_checkpoint_is_refused_and_never_runs(tmp_path, synth_dir, capsys, name, command):
    marker = tmp_path / "payload-ran"
    ckpt_dir = tmp_path / "runs" / "t" / "checkpoints"
    _plant(ckpt_dir / name, marker)
    before = sorted(p.name for p in ckpt_dir.iterdir())
    assert main([command, "configs/demo.toml", *_args(tmp_path, synth_dir), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert name in line and "pickle" in line
    assert not marker.exists()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before  # the run was left as it was


def test_pickled_pretrained_weights_are_refused_and_never_run(tmp_path, synth_dir, capsys):
    marker = tmp_path / "payload-ran"
    evil = _plant(tmp_path / "resnet18.pth", marker)
    assert (
        main(["train", "configs/demo.toml", *_args(tmp_path, synth_dir), "--pretrained", str(evil)])
        == 2
    )
    line = _one_error_line(capsys)
    assert "resnet18.pth" in line
    assert not marker.exists()


def test_model_file_is_safetensors_with_config_and_skeleton(tmp_path, synth_dir, capsys):
    assert main(["run", "configs/demo.toml", *_args(tmp_path, synth_dir)]) == 0
    capsys.readouterr()
    path = tmp_path / "runs" / "t" / "model.safetensors"
    with safe_open(str(path), "pt") as f:  # safetensors alone reads it
        meta = f.metadata()
        names = set(f.keys())
    config = json.loads(meta["config"])
    assert meta["format"] == "fedpose-model" and meta["format_version"] == "1"
    assert config["model"]["width"] == 4 and config["fed"]["rounds"] == 1
    assert meta["skeleton"] == "synth-arm"
    assert "final_layer.weight" in names
    assert main(["eval", str(path), "-c", f"data.root={synth_dir}"]) == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "last.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["format"] == "fedpose-checkpoint"


def test_checkpoint_of_another_format_version_is_refused(tmp_path, synth_dir, capsys):
    from safetensors.torch import load_file, save_file

    assert main(["run", "configs/demo.toml", *_args(tmp_path, synth_dir)]) == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "last.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(ckpt))
    meta["format_version"] = "99"
    save_file(tensors, str(ckpt), meta)
    (ckpt.parent / "previous.safetensors").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["run", "configs/demo.toml", *_args(tmp_path, synth_dir), "--resume"]) == 2
    assert "version '99'" in _one_error_line(capsys)


def test_safetensors_header_length_with_pickle_byte_is_read(tmp_path):
    """A header length whose low byte is 0x80 (a pickle's first byte) is still a safetensors
    file: the framing decides, not the first byte."""
    from safetensors.torch import save as save_bytes

    from fedpose.model.io import _read_safetensors

    for pad in range(300):
        data = save_bytes({"w": torch.zeros(2)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    else:
        pytest.skip("no padding gave a header length ending in 0x80")
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    tensors, meta = _read_safetensors(path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and meta["pad"].startswith("x")

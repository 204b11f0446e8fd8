"""A model file, checkpoint or client-state file is data, never a place or a plan: its config
chooses no folder, its sizes are checked before anything is allocated, destroyed weights are
refused, an output never replaces its input, and every malformed file ends in one `error:`
line naming the file (and the key)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fedtiny import tiny_cli_args
from safetensors.torch import save_file

from fedpose.cli import main
from fedpose.config import Config
from fedpose.data.records import ARM
from fedpose.model.io import _tensor_digest, save_checkpoint, save_model
from fedpose.model.pose_resnet import PoseResNet

DEEP = "[" * 100_000 + "]" * 100_000
FEDDYN_2 = ("fed.method=feddyn", "fed.rounds=2")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _tiny_cfg(root: Path | str = "data/synth-arm") -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.input_size = str(root), 32
    cfg.model.width, cfg.model.deconv_filters = 4, 8
    cfg.train.flip_test = False
    return cfg


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return PoseResNet(ARM.num_joints, depth=18, width=4, deconv_filters=8).state_dict()


def _model_file(path: Path, weights=None, config=None, **meta) -> Path:
    """A model file as save_model writes it, with its metadata replaced by `meta` and its
    config by `config` (a dict or raw text); the checksum always matches."""
    weights = {k: v.contiguous().clone() for k, v in (weights or _weights()).items()}
    config = _tiny_cfg().to_dict() if config is None else config
    metadata = {
        "format": "fedpose-model",
        "format_version": "1",
        "config": config if isinstance(config, str) else json.dumps(config),
        "skeleton": "synth-arm",
        "sha256": _tensor_digest(weights),
        **meta,
    }
    save_file(weights, str(path), metadata)
    return path


def _commands(model: Path, tmp_path: Path, synth_dir: Path) -> list[list[str]]:
    image = sorted((synth_dir / "images").iterdir())[0]
    return [
        ["eval", str(model), "-c", f"data.root={synth_dir}"],
        ["predict", str(model), str(image), "--out", str(tmp_path / "p.png")],
        ["export", str(model), "--onnx", str(tmp_path / "m.onnx")],
    ]


# ----------------------------------------------------------------------------- a file is no place
def test_a_model_files_data_root_is_never_read_or_written(tmp_path, synth_dir, capsys, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "images").mkdir()
    (victim / "images" / "00000.png").write_bytes(b"the user's own picture")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    model = _model_file(tmp_path / "m.safetensors", config=_tiny_cfg(victim).to_dict())
    monkeypatch.chdir(tmp_path)  # no data/synth-arm here either: nothing may be generated
    assert main(["eval", str(model)]) == 2
    assert "annotations.json" in _one_error_line(capsys)
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "data").exists()
    # the data named on the command line is what is evaluated
    assert main(["eval", str(model), "-c", f"data.root={synth_dir}"]) == 0


def test_a_missing_synth_arm_root_is_an_error_unless_generation_is_asked_for(tmp_path, capsys):
    typo = tmp_path / "synth-amr"
    args = tiny_cli_args(tmp_path / "runs", typo, "data.synth_n=16", "data.synth_size=64")
    assert main(["run", "configs/demo.toml", *args]) == 2
    assert "data.generate=true" in _one_error_line(capsys)
    assert not typo.exists()
    assert main(["run", "configs/demo.toml", *args, "-c", "data.generate=true"]) == 0
    assert (typo / "annotations.json").is_file()


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("model", "width", 2**20), ("data", "input_size", 65536), ("model", "deconv_filters", 2**24)],
)
def test_absurd_sizes_in_a_model_file_are_refused_before_allocation(
    tmp_path, synth_dir, capsys, section, key, value
):
    config = _tiny_cfg().to_dict()
    config[section][key] = value
    model = _model_file(tmp_path / "m.safetensors", config=config)
    for argv in _commands(model, tmp_path, synth_dir):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert str(model) in line and f"{section}.{key}" in line


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_weights_are_refused_by_eval_predict_and_export(
    tmp_path, synth_dir, capsys, bad
):
    weights = _weights()
    weights["final_layer.weight"][0, 0, 0, 0] = bad
    model = _model_file(tmp_path / "m.safetensors", weights)
    for argv in _commands(model, tmp_path, synth_dir):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert str(model) in line and "final_layer.weight" in line and "NaN or Inf" in line
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p.png").exists()


def test_a_non_finite_model_is_never_written(tmp_path):
    weights = _weights()
    weights["final_layer.bias"][0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_model(tmp_path / "m.safetensors", weights, _tiny_cfg(), ARM)
    assert not (tmp_path / "m.safetensors").exists()


def test_an_output_never_replaces_its_input(tmp_path, synth_dir, capsys):
    model = _model_file(tmp_path / "m.safetensors")
    before = model.read_bytes()
    image = sorted((synth_dir / "images").iterdir())[0]
    image_bytes = image.read_bytes()
    for argv in (
        ["export", str(model), "--onnx", str(model)],
        ["export", str(model), "--onnx", str(tmp_path / "." / "m.safetensors")],
        ["predict", str(model), str(image), "--out", str(image)],
        ["predict", str(model), str(image), "--out", str(model)],
    ):
        assert main(argv) == 2
        assert "would replace it" in _one_error_line(capsys)
    assert model.read_bytes() == before and image.read_bytes() == image_bytes


# ----------------------------------------------------------------------------- deep and malformed
def _raw_safetensors(path: Path, header: str) -> Path:
    data = header.encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data)
    return path


@pytest.mark.parametrize(
    "where", ["header", "metadata-config", "config-value"], ids=lambda w: w.replace("-", " ")
)
def test_deeply_nested_json_in_a_model_file_is_one_error_line(tmp_path, synth_dir, capsys, where):
    if where == "header":
        model = _raw_safetensors(tmp_path / "m.safetensors", '{"__metadata__": ' + DEEP + "}")
    elif where == "metadata-config":
        model = _model_file(tmp_path / "m.safetensors", config=DEEP)
    else:
        config = _tiny_cfg().to_dict()
        model = _model_file(
            tmp_path / "m.safetensors",
            config=json.dumps(config)[:-1] + ', "x": ' + DEEP + "}",
        )
    assert main(_commands(model, tmp_path, synth_dir)[0]) == 2
    assert str(model) in _one_error_line(capsys)


def _run_args(tmp_path: Path, synth_dir: Path, *extra: str) -> list[str]:
    return ["configs/demo.toml", *tiny_cli_args(tmp_path / "runs", synth_dir, *extra)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_dir) -> Path:
    """The runs folder of one finished federated run `t` (FedDyn: client states on disk) and
    one centralized run `c`."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", *_run_args(out, synth_dir, "fed.method=feddyn")]) == 0
    assert main(["train", *_run_args(out, synth_dir, "train.epochs=1", "name=c")]) == 0
    return out


@pytest.mark.parametrize(
    ("command", "change", "key"),
    [
        ("run", lambda s: s.pop("weights"), "'weights' is missing"),
        ("run", lambda s: setattr(s["server"], "round", "2"), "server.round"),
        ("run", lambda s: s.update(weights={"x": torch.zeros(1)}), "tensor names differ"),
        ("run", lambda s: s.update(server=[1, 2]), "'server'"),
        ("run", lambda s: setattr(s["server"], "norms", [True]), "server.norms[0]"),
        ("train", lambda s: s.pop("optimizer"), "'optimizer' is missing"),
        ("train", lambda s: s.update(epoch="1"), "'epoch'"),
        ("train", lambda s: s.update(epoch=1.5), "'epoch'"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_checksum_consistent_but_malformed_checkpoint_is_one_error_line(
    tmp_path, synth_dir, finished, capsys, command, change, key
):
    import shutil

    from fedpose.fl.server import CHECKPOINT_CLASSES
    from fedpose.model.io import read_checkpoint

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    name = "t" if command == "run" else "c"
    ckpt_dir = tmp_path / "runs" / name / "checkpoints"
    state, identity = read_checkpoint(ckpt_dir / "last.safetensors", CHECKPOINT_CLASSES)
    change(state)
    for path in ckpt_dir.glob("*.safetensors"):
        path.unlink()
    save_checkpoint(ckpt_dir, state, identity)
    extra = ["train.epochs=2", "name=c"] if command == "train" else FEDDYN_2
    capsys.readouterr()
    assert main([command, *_run_args(tmp_path, synth_dir, *extra), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "last.safetensors" in line and key in line


def test_deeply_nested_checkpoint_state_is_one_error_line(tmp_path, synth_dir, finished, capsys):
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    ckpt_dir = tmp_path / "runs" / "t" / "checkpoints"
    for path in ckpt_dir.glob("*.safetensors"):
        path.unlink()
    tensors = {"t0": torch.zeros(1)}
    metadata = {
        "format": "fedpose-checkpoint",
        "format_version": "1",
        "state": DEEP,
        "sha256": _tensor_digest(tensors),
    }
    save_file(tensors, str(ckpt_dir / "last.safetensors"), metadata)
    assert main(["run", *_run_args(tmp_path, synth_dir, *FEDDYN_2), "--resume"]) == 2
    assert "last.safetensors" in _one_error_line(capsys)


@pytest.mark.parametrize("damage", ["truncated", "pickled", "empty"])
def test_a_damaged_client_state_file_is_one_error_line(
    tmp_path, synth_dir, finished, capsys, damage
):
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    files = sorted((tmp_path / "runs" / "t" / "checkpoints" / "client_state").iterdir())
    assert files
    for path in files:
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "pickled":
            torch.save({"x": torch.zeros(2)}, path)
        else:
            path.write_bytes(b"")
    capsys.readouterr()
    assert main(["run", *_run_args(tmp_path, synth_dir, *FEDDYN_2), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "client_state" in line and "damaged client state file" in line

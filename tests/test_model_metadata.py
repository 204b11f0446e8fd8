"""Self-describing model files: `model.safetensors` and the exported ONNX file carry fedpose's
version and commit, joint names, bones, flip pairs, input size and normalisation, the crop and
decode rules, and no absolute path; a run's checkpoint becomes a model file or an ONNX file. The
files are read by a fresh interpreter with `safetensors` and `onnxruntime` alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedtiny import tiny_cli_args
from safetensors.torch import load_file

from fedpose.cli import main
from fedpose.data.records import ARM
from fedpose.model.conventions import source_commit
from fedpose.version import fedpose_version

pytestmark = pytest.mark.usefixtures("one_thread")

# what a deployment would run: no fedpose import anywhere in it
READER = """
import json, sys
import numpy as np
import onnxruntime as ort
from safetensors import safe_open

with safe_open(sys.argv[1], framework="numpy") as f:
    st_meta = dict(f.metadata())
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
onnx_meta = dict(session.get_modelmeta().custom_metadata_map)
size = int(onnx_meta["input_size"])
image = np.zeros((1, 3, size, size), dtype=np.float32)
(heatmaps,) = session.run([onnx_meta["onnx_output"]], {onnx_meta["onnx_input"]: image})
assert not any(name == "fedpose" or name.startswith("fedpose.") for name in sys.modules)
print(json.dumps({"safetensors": st_meta, "onnx": onnx_meta, "shape": list(heatmaps.shape)}))
"""

CONVENTIONS = (
    "fedpose_version",
    "fedpose_commit",
    "skeleton",
    "joints",
    "skeleton_bones",
    "flip_pairs",
    "input_size",
    "input_normalisation",
    "heatmap_stride",
    "crop",
    "decode",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synth_dir) -> Path:
    """A one-round federated run of the tiny model, paths absolute as a user's could be."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "configs/demo.toml", *tiny_cli_args(out, synth_dir)]) == 0
    return out / "t"


def _read_without_fedpose(model: Path, onnx_file: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", READER, str(model), str(onnx_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def _absolute_paths(values: dict) -> list[str]:
    """Every string in the metadata (config JSON included) that is an absolute path."""
    found = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and (value.startswith("/") or value[1:3] == ":\\"):
            found.append(value)

    for key, value in values.items():
        walk(json.loads(value) if key == "config" else value)
    return found


def test_model_and_onnx_files_describe_themselves(run_dir, synth_dir, tmp_path):
    onnx_file = tmp_path / "pose.onnx"
    model = run_dir / "model.safetensors"
    assert main(["export", str(model), "--onnx", str(onnx_file)]) == 0
    read = _read_without_fedpose(model, onnx_file)
    st, ox = read["safetensors"], read["onnx"]
    for key in CONVENTIONS:
        assert st[key] == ox[key], key
    assert json.loads(st["joints"]) == list(ARM.joints)
    assert json.loads(st["flip_pairs"]) == [list(p) for p in ARM.flip_pairs]
    assert json.loads(st["skeleton_bones"]) == [list(b) for b in ARM.bones]
    assert st["fedpose_version"] == fedpose_version()
    assert st["fedpose_commit"] == source_commit()
    assert json.loads(st["input_normalisation"])["mean"] == [0.485, 0.456, 0.406]
    assert read["shape"] == [1, ARM.num_joints, 8, 8]  # input 32, heatmaps a quarter
    assert _absolute_paths(st) == [] and _absolute_paths(ox) == []
    config = json.loads(st["config"])
    assert config["data"]["root"] and not Path(config["data"]["root"]).is_absolute()
    # relative to the folder the model was written from, the root still names the data
    assert (Path.cwd() / config["data"]["root"]).resolve() == synth_dir.resolve()
    # the stored root describes the training data; eval reads the data the user names
    # (a model file's paths are never used: docs/reliability.md)
    assert main(["eval", str(model), "-c", f"data.root={synth_dir}"]) == 0


def test_a_checkpoint_becomes_the_model_file(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    out = tmp_path / "from-ckpt.safetensors"
    assert main(["model-from-checkpoint", str(ckpt), "--out", str(out)]) == 0
    made, final = load_file(out), load_file(run_dir / "model.safetensors")
    assert made.keys() == final.keys()
    assert all(torch.equal(made[k], final[k]) for k in final)  # the last round's weights
    onnx_file = tmp_path / "ckpt.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_file)]) == 0
    read = _read_without_fedpose(out, onnx_file)
    assert json.loads(read["onnx"]["joints"]) == list(ARM.joints)


def test_a_checkpoint_with_another_runs_config_is_refused(run_dir, tmp_path, capsys):
    config = json.loads((run_dir / "config.json").read_text())
    config["fed"]["method"] = "fedavg"
    other = tmp_path / "config.json"
    other.write_text(json.dumps(config))
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    out = tmp_path / "m.safetensors"
    argv = ["model-from-checkpoint", str(ckpt), "--out", str(out), "--config", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the config" in err[0] and not out.exists()


def test_a_new_setting_at_its_default_keeps_old_checkpoints_resumable():
    from fedpose.config import Config
    from fedpose.model.io import config_hash

    now = Config().to_dict()
    before = json.loads(json.dumps(now))
    del before["fed"]["dirichlet_min_size"]  # a config.json written before the setting existed
    assert config_hash(before) == config_hash(now)
    now["fed"]["dirichlet_min_size"] = 10
    assert config_hash(before) != config_hash(now)

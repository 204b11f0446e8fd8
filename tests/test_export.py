"""ONNX export: onnxruntime gives PyTorch's heatmaps on real LSP crops, at any batch size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedpose.cli import main
from fedpose.config import Config
from fedpose.data.dataset import PoseDataset
from fedpose.data.lsp import load_lsp
from fedpose.data.records import LSP
from fedpose.model.export import INPUT_NAME, ONNX_OPSET, export_onnx
from fedpose.model.io import save_model
from fedpose.model.pose_resnet import PoseResNet

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_SIZE = 64


def _busy_model() -> PoseResNet:
    """A small PoseResNet whose heatmaps are far from zero. A freshly initialised head outputs
    maps of about 1e-3, which would pass a 1e-4 comparison almost whatever the graph did."""
    gen = torch.Generator().manual_seed(0)
    model = PoseResNet(LSP.num_joints, depth=18, width=16, deconv_filters=32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.2, 0.2, generator=gen)
            elif isinstance(module, torch.nn.ConvTranspose2d | torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        model.final_layer.weight.mul_(0.1)  # heatmaps of order 1, like a trained model's
    return model.eval()


@pytest.fixture(scope="module")
def lsp_images(request) -> torch.Tensor:
    """Five LSP images (the repository's copy, else the shared dataset), cropped and normalised
    by fedpose's own evaluation pipeline."""
    root = Path(__file__).parent / "data" / "lsp"
    if not root.is_dir():
        root = request.getfixturevalue("datasets") / "lsp"
    records = load_lsp(root, "all")[:5]
    dataset = PoseDataset(records, LSP, input_size=INPUT_SIZE, train=False)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.mark.slow  # an export and two onnxruntime sessions, seconds: make test-slow
def test_onnxruntime_heatmaps_match_pytorch_on_lsp_images(tmp_path, lsp_images):
    model = _busy_model()
    path = export_onnx(model, INPUT_SIZE, tmp_path / "pose.onnx", LSP)
    with torch.no_grad():
        expected = model(lsp_images).numpy()
    assert expected.shape == (5, LSP.num_joints, INPUT_SIZE // 4, INPUT_SIZE // 4)
    assert expected.std() > 0.1  # the comparison below means something

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (lsp_images, lsp_images[:1]):  # the batch axis is dynamic
        (heatmaps,) = session.run(None, {INPUT_NAME: batch.numpy()})
        np.testing.assert_allclose(heatmaps, expected[: len(batch)], rtol=0, atol=1e-4)

    import onnx  # here, not at the top: its import costs every test worker a second

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == ONNX_OPSET
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["joints"]) == list(LSP.joints)
    assert metadata["input_size"] == str(INPUT_SIZE)
    assert model.training is False  # export leaves the model as it found it


def test_export_command_writes_the_model_file_as_onnx(tmp_path, lsp_images, capsys):
    cfg = Config()
    cfg.data.dataset, cfg.data.input_size = "lsp", INPUT_SIZE
    cfg.model.depth, cfg.model.width, cfg.model.deconv_filters = 18, 16, 32
    model = _busy_model()
    save_model(tmp_path / "model.safetensors", model.state_dict(), cfg, LSP)

    out = tmp_path / "deploy" / "pose.onnx"
    assert main(["export", str(tmp_path / "model.safetensors"), "--onnx", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out}"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (heatmaps,) = session.run(None, {INPUT_NAME: lsp_images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(heatmaps, model(lsp_images).numpy(), rtol=0, atol=1e-4)


def test_export_of_a_missing_model_is_one_error_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.pt" in err[0]
    assert not (tmp_path / "x.onnx").exists()

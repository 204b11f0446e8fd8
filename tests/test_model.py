"""PoseResNet, its torchvision-compatible backbone, the loss, decoding and flip test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedpose.config import ModelConfig, TrainConfig
from fedpose.data.records import ARM, LSP, PoseRecord
from fedpose.model.decode import (
    flip_back,
    get_max_preds,
    heatmaps_to_image_coords,
    predict,
    refine_quarter,
)
from fedpose.model.inference import load_weights, predict_image, predict_records
from fedpose.model.loss import JointsMSELoss
from fedpose.model.optim import make_optimizer
from fedpose.model.pose_resnet import PoseResNet, PretrainedError, build_model, load_pretrained
from fedpose.model.resnet import ResNet


@pytest.mark.parametrize("depth,width", [(18, 8), (50, 4)])
def test_output_shapes(depth, width):
    model = PoseResNet(5, depth=depth, width=width, deconv_filters=16)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5, 16, 16)
    expansion = 1 if depth == 18 else 4
    assert model.out_channels == width * 8 * expansion
    assert model(torch.randn(1, 3, 128, 96)).shape == (1, 5, 32, 24)


def test_torchvision_parameter_names():
    r18 = ResNet(18, width=8).state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.conv2.weight",
    ):
        assert key in r18, key
    assert "layer1.0.downsample.0.weight" not in r18  # stride 1, same width: no projection
    r50 = ResNet(50, width=4).state_dict()
    for key in (
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer3.5.bn3.num_batches_tracked",
        "layer4.2.conv1.weight",
    ):
        assert key in r50, key
    # torchvision's resnet18 / resnet50 state dicts have 122 / 320 keys, 2 of them fc.*
    assert len(r18) == 120 and len(r50) == 318
    # standard shapes at width 64
    full = ResNet(50).state_dict()
    assert full["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert full["conv1.weight"].shape == (64, 3, 7, 7)


def test_pose_resnet_names_match_simplebaseline():
    keys = PoseResNet(3, depth=18, width=8, deconv_filters=16).state_dict()
    for key in (
        "deconv_layers.0.weight",
        "deconv_layers.1.running_mean",
        "deconv_layers.3.weight",
        "deconv_layers.7.bias",
        "final_layer.weight",
        "final_layer.bias",
    ):
        assert key in keys, key
    assert keys["deconv_layers.0.weight"].shape == (64, 16, 4, 4)


def test_simplebaseline_head_init():
    model = PoseResNet(3, depth=18, width=8)
    assert float(model.final_layer.weight.detach().std()) == pytest.approx(0.001, rel=0.2)
    assert float(model.final_layer.bias.detach().abs().max()) == 0
    assert float(model.deconv_layers[0].weight.detach().std()) == pytest.approx(0.001, rel=0.2)
    assert float(model.deconv_layers[1].weight.detach().min()) == 1


def test_load_pretrained_round_trip(tmp_path):
    source = ResNet(18, width=8)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
        source.bn1.running_mean.uniform_()
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(1000, 64)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    cfg = ModelConfig(depth=18, width=8, deconv_filters=16, pretrained=str(path))
    model = build_model(cfg, num_joints=3)
    report = load_pretrained(model, cfg.pretrained)
    assert len(report["loaded"]) == 120
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)

    # the classic torchvision files have no num_batches_tracked; a "module." prefix is fine too
    old = {"module." + k: v for k, v in state.items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": old}, path)
    report = load_pretrained(PoseResNet(3, depth=18, width=8, deconv_filters=16), path)
    assert report["ignored"] == ["fc.bias", "fc.weight"]


def test_load_pretrained_errors(tmp_path):
    model = PoseResNet(3, depth=18, width=8, deconv_filters=16)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(PretrainedError, match="not a PyTorch state dict"):
        load_pretrained(model, junk)
    wrong = tmp_path / "r34.pth"
    torch.save(ResNet(34, width=8).state_dict(), wrong)
    with pytest.raises(PretrainedError, match=r"ResNet-34 of width 8\); unexpected 96: layer1.2"):
        load_pretrained(model, wrong)
    torch.save(ResNet(18, width=16).state_dict(), wrong)
    with pytest.raises(PretrainedError, match=r"ResNet-18 of width 16\); shape mismatch"):
        load_pretrained(model, wrong)
    state = ResNet(18, width=8).state_dict()
    del state["layer4.1.conv2.weight"]
    torch.save(state, wrong)
    with pytest.raises(PretrainedError, match="missing 1: layer4.1.conv2.weight"):
        load_pretrained(model, wrong)


def _reference_sb_loss(output, target, weight):
    # SimpleBaseline's loop, written out
    n, j = output.shape[:2]
    pred = output.reshape(n, j, -1).split(1, 1)
    gt = target.reshape(n, j, -1).split(1, 1)
    loss = 0
    for i in range(j):
        p, g = pred[i].squeeze(), gt[i].squeeze()
        loss += 0.5 * nn.functional.mse_loss(p * weight[:, i], g * weight[:, i])
    return loss / j


def test_joints_mse_loss():
    crit = JointsMSELoss()
    target = torch.rand(4, 3, 8, 8)
    weight = torch.ones(4, 3, 1)
    assert float(crit(target.clone(), target, weight)) == 0
    output = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(
        crit(output, target, weight), _reference_sb_loss(output, target, weight)
    )
    # a zero weight removes the joint's error entirely
    weight[:, 1] = 0
    noisy = output.clone()
    noisy[:, 1] += 100
    torch.testing.assert_close(crit(noisy, target, weight), crit(output, target, weight))
    torch.testing.assert_close(
        crit(output, target, weight), _reference_sb_loss(output, target, weight)
    )
    assert float(JointsMSELoss(False)(output, target)) == pytest.approx(
        0.5 * float(((output - target) ** 2).mean())
    )


def test_get_max_preds_and_quarter_shift():
    hm = np.zeros((1, 3, 8, 8), np.float32)
    hm[0, 0, 2, 5] = 1.0
    hm[0, 0, 2, 6] = 0.5  # higher neighbour to the right
    hm[0, 1, 7, 0] = 1.0  # on the border: no refinement
    coords, maxvals = get_max_preds(hm)
    np.testing.assert_allclose(coords[0], [[5, 2], [0, 7], [0, 0]])
    np.testing.assert_allclose(maxvals[0, :, 0], [1, 1, 0])
    refined = refine_quarter(hm, coords)
    np.testing.assert_allclose(refined[0, 0], [5.25, 2.0])
    np.testing.assert_allclose(refined[0, 1], [0.0, 7.0])


def test_heatmaps_to_image_coords_centre():
    hm = np.zeros((1, 1, 16, 16), np.float32)
    hm[0, 0, 7:9, 7:9] = 1.0  # equal 2x2 block: argmax (7, 7), quarter shift to (7.25, 7.25)
    out = heatmaps_to_image_coords(hm, np.array([[100.0, 50.0]]), np.array([0.8]), 64)
    # heatmap centre 7.5 is the crop centre; 0.25 heatmap px short of it is 0.25 * 160 / 16 px
    np.testing.assert_allclose(out[0, 0], [97.5, 47.5])


class PoolModel(nn.Module):
    """A perfectly translation-equivariant 'pose model': 4x4 average pooling of the channels."""

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 4)


def test_flip_back_needs_no_shift():
    # mirroring the input mirrors the stride-4 heatmaps exactly under fedpose's convention,
    # so flip test must return the unflipped output unchanged (SimpleBaseline's one-pixel
    # shift would move it)
    x = torch.rand(2, 3, 64, 64)
    model = PoolModel()
    torch.testing.assert_close(predict(model, x, (), flip_test=True), model(x))
    # with pairs, the mirrored pass swaps channels back
    pairs = ((0, 2),)
    flipped = flip_back(model(torch.flip(x, dims=[-1])), pairs)
    torch.testing.assert_close(flipped, model(x)[:, [2, 1, 0]])
    torch.testing.assert_close(flip_back(flip_back(x, pairs), pairs), x)
    np.testing.assert_allclose(flip_back(x.numpy(), pairs), flip_back(x, pairs).numpy())


def test_flip_test_is_symmetric():
    torch.manual_seed(0)
    model = PoseResNet(LSP.num_joints, depth=18, width=8, deconv_filters=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        direct = predict(model, x, LSP.flip_pairs)
        mirrored = predict(model, torch.flip(x, dims=[-1]), LSP.flip_pairs)
    torch.testing.assert_close(flip_back(mirrored, LSP.flip_pairs), direct, atol=1e-6, rtol=1e-5)


def test_predict_records_shape_and_mode(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (90, 70), (30, 90, 200)).save(path)
    records = [
        PoseRecord(
            image=path,
            joints=np.zeros((3, 2), np.float32),
            visibility=np.ones(3, np.float32),
            center=np.array([45.0, 35.0], np.float32),
            scale=0.4,
        )
        for _ in range(5)
    ]
    model = PoseResNet(3, depth=18, width=8, deconv_filters=16)
    model.train()
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        pred = predict_records(model, records, ARM, input_size=64, batch_size=2, progress=progress)
        assert progress.tasks[0].completed == 5
    assert pred.shape == (5, 3, 2)
    assert model.training  # restored
    # every prediction lies inside the crop around the centre (side 80 px)
    assert np.all(np.abs(pred - [45.0, 35.0]) <= 40.0)
    joints, confidence = predict_image(model, path, 64, ARM)
    assert joints.shape == (3, 2) and confidence.shape == (3,)
    assert np.all(np.abs(joints - [44.5, 34.5]) <= 45.0)  # the crop is the whole image


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizer_steps_over_all_parameters_at_once_with_the_same_bits(optimizer):
    """make_optimizer uses torch's multi-tensor (foreach) step for speed; it must train exactly
    as the per-parameter loop does."""
    train = TrainConfig(optimizer=optimizer, lr=0.01, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    states = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = PoseResNet(5, depth=18, width=4, deconv_filters=8)
        opt = make_optimizer(model, train)
        if not foreach:
            opt = type(opt)(model.parameters(), **{**opt.defaults, "foreach": False})
        assert opt.defaults["foreach"] is foreach
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        states.append(model.state_dict())
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_load_weights_sets_what_load_state_dict_sets_and_refuses_what_it_refuses():
    torch.manual_seed(0)
    source = PoseResNet(3, depth=18, width=4, deconv_filters=8)
    source.train()(torch.randn(2, 3, 32, 32))  # BatchNorm statistics and counters move
    weights = source.state_dict()
    fast, reference = (PoseResNet(3, depth=18, width=4, deconv_filters=8) for _ in range(2))
    load_weights(fast, weights)
    reference.load_state_dict(weights)
    for name, tensor in reference.state_dict().items():
        got = fast.state_dict()[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert all(p.requires_grad for p in fast.parameters())  # still trainable parameters
    missing = {n: t for n, t in weights.items() if n != "final_layer.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(fast, missing)
    reshaped = {**weights, "final_layer.bias": torch.zeros(4)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(fast, reshaped)

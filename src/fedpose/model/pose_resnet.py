"""SimpleBaseline PoseResNet (Xiao et al., "Simple Baselines for Human Pose Estimation and
Tracking", ECCV 2018): a ResNet, a few stride-2 deconvolutions, and a 1x1 conv to J heatmaps.

PoseResNet is a ResNet with a head, not a wrapper around one, so its state dict has the same
names as SimpleBaseline's checkpoints (conv1, layer1..4, deconv_layers.N, final_layer) and the
backbone part has torchvision's names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from fedpose.config import ModelConfig
from fedpose.model.resnet import RESNET_SPECS, Bottleneck, ResNet


class PoseResNet(ResNet):
    def __init__(
        self,
        num_joints: int,
        depth: int = 50,
        width: int = 64,
        deconv_layers: int = 3,
        deconv_filters: int = 256,
    ):
        super().__init__(depth, width)
        if num_joints < 1:
            raise ValueError(f"num_joints must be positive, got {num_joints}")
        self.num_joints = num_joints
        layers: list[nn.Module] = []
        inplanes = self.out_channels
        for _ in range(deconv_layers):
            # k=4, s=2, p=1: exactly doubles the size; output_padding stays 0
            layers += [
                nn.ConvTranspose2d(
                    inplanes,
                    deconv_filters,
                    kernel_size=4,
                    stride=2,
                    padding=1,
                    output_padding=0,
                    bias=False,
                ),
                nn.BatchNorm2d(deconv_filters),
                nn.ReLU(inplace=True),
            ]
            inplanes = deconv_filters
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(inplanes, num_joints, kernel_size=1, stride=1, padding=0)
        self._init_head()

    def _init_head(self) -> None:
        # SimpleBaseline: tiny weights so the first heatmaps are near zero, like the targets
        for m in self.deconv_layers.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.final_layer.weight, std=0.001)
        nn.init.zeros_(self.final_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.deconv_layers(x)
        return self.final_layer(x)


def build_model(cfg: ModelConfig, num_joints: int) -> PoseResNet:
    """A freshly initialised PoseResNet of the config's shape.

    cfg.pretrained is not loaded here (call load_pretrained): rebuilding a trained model from
    its saved config must not need the ImageNet file.
    """
    return PoseResNet(
        num_joints,
        depth=cfg.depth,
        width=cfg.width,
        deconv_layers=cfg.deconv_layers,
        deconv_filters=cfg.deconv_filters,
    )


class PretrainedError(ValueError):
    pass


def load_pretrained(model: ResNet, path: str | Path) -> dict[str, list[str]]:
    """Load a torchvision-format ResNet state dict into the model's backbone.

    Accepts a plain state dict or one under "state_dict"/"model", with or without a "module."
    prefix. The classifier (fc.*) is ignored; every other key must match the backbone exactly,
    in name and shape. Returns {"loaded": [...], "ignored": [...]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights not found")
    if path.suffix == ".safetensors":
        try:
            obj = load_safetensors_file(str(path))
        except Exception as e:
            raise PretrainedError(
                f"{path}: not a safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    else:
        try:
            # weights_only: the unpickler builds tensors and containers only, never runs code
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e).strip()
            why = (
                "it holds objects other than tensors, which could run code when loaded"
                if text.startswith("Weights only load failed") or not text
                else text.splitlines()[0]
            )
            raise PretrainedError(
                f"{path}: not a PyTorch state dict of plain tensors; "
                f"refused ({type(e).__name__}: {why})"
            ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}

    own = model.backbone_state_dict()
    ignored = sorted(k for k in state if k.startswith("fc."))
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # the classic torchvision files predate BatchNorm's num_batches_tracked counter
    missing = sorted(k for k in set(own) - set(given) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(given) - set(own))
    shape = sorted(
        f"{k}: file {tuple(given[k].shape)}, model {tuple(own[k].shape)}"
        for k in set(own) & set(given)
        if given[k].shape != own[k].shape
    )
    if missing or unexpected or shape:
        parts = [
            f"{path}: does not fit a ResNet-{model.depth} backbone of width {model.width}"
            f"{_guess_architecture(given)}"
        ]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shape),
        ):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:8])}{more}")
        raise PretrainedError("; ".join(parts))
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k, v in given.items():
            target = params.get(k, buffers.get(k))
            target.copy_(v.to(target.dtype))
    return {"loaded": sorted(given), "ignored": ignored}


def _guess_architecture(state: dict[str, torch.Tensor]) -> str:
    """' (the file looks like ResNet-34 of width 64)', or '' when it is no ResNet we know."""
    blocks = []
    for layer in range(1, 5):
        ids = {k.split(".")[1] for k in state if k.startswith(f"layer{layer}.")}
        blocks.append(len(ids))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    conv1 = state.get("conv1.weight")
    for depth, (block, layers) in RESNET_SPECS.items():
        if tuple(blocks) == layers and (block is Bottleneck) == bottleneck and conv1 is not None:
            return f" (the file looks like ResNet-{depth} of width {conv1.shape[0]})"
    return ""

"""ONNX export of a PoseResNet: the network alone, images in, heatmaps out.

The graph takes `image`, float32 (batch, 3, S, S), normalised exactly as fedpose's PoseDataset
feeds the network (RGB crop around the person, (pixel / 255 - ImageNet mean) / ImageNet std), and
returns `heatmaps`, float32 (batch, J, S/4, S/4). The batch axis is dynamic; the side S is fixed
at the model's configured input size. Cropping and decoding heatmaps to image pixels stay outside
the graph (fedpose.data.dataset and fedpose.model.decode), as in SimpleBaseline.

Exporter: torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) at ONNX
opset 17. torch 2.13's default, the torch.export-based exporter, gives the same heatmaps but
takes about ten times as long and logs warnings for torchvision operators fedpose does not use;
the TorchScript one needs nothing beyond torch and onnx, and runs offline. Opset 17 runs on
onnxruntime 1.13 and later and on TensorRT 8.6 and later.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from fedpose.data.dataset import HEATMAP_STRIDE, IMAGENET_MEAN, IMAGENET_STD
from fedpose.data.records import Skeleton

ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "heatmaps"


def export_onnx(
    model: torch.nn.Module,
    input_size: int,
    out_file: str | Path,
    skeleton: Skeleton | None = None,
    opset: int = ONNX_OPSET,
    conventions: dict[str, str] | None = None,
) -> Path:
    """Write `model` (in eval mode, on the CPU) as an ONNX file; returns its path.

    The file's metadata records the input size, heatmap stride, normalisation and, with a
    skeleton, the joint names in heatmap order (a JSON list), its bones and flip pairs, so a
    deployment needs no fedpose to read them. `conventions` (model/conventions.py's
    `describe_model`, as `model.safetensors` carries them) adds the crop and decode rules, the
    fedpose version and commit.
    """
    try:
        import onnx  # imported here: only export needs it, and it is an optional dependency
    except ModuleNotFoundError:
        problem = "ONNX export needs the onnx package: pip install 'fedpose[onnx]'"
        raise ValueError(problem) from None

    if input_size % HEATMAP_STRIDE:
        raise ValueError(f"input_size must be a multiple of {HEATMAP_STRIDE}, got {input_size}")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters()).device
    model.cpu().eval()
    example = torch.zeros(2, 3, input_size, input_size)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a planted link: removed, never written through
    try:
        with warnings.catch_warnings():
            # the deprecation notice of the TorchScript exporter; the choice is explained above
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        metadata = {
            "producer": "fedpose",
            "input_size": str(input_size),
            "heatmap_stride": str(HEATMAP_STRIDE),
            "input_normalisation": f"(rgb/255 - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)}",
        }
        if skeleton is not None:
            metadata["skeleton"] = skeleton.name
            metadata["joints"] = json.dumps(list(skeleton.joints))
            metadata["skeleton_bones"] = json.dumps([list(b) for b in skeleton.bones])
            metadata["flip_pairs"] = json.dumps([list(p) for p in skeleton.flip_pairs])
        metadata.update(conventions or {})
        metadata["input_size"] = str(input_size)  # the graph's, whatever a caller passed
        metadata["onnx_input"] = INPUT_NAME
        metadata["onnx_output"] = OUTPUT_NAME
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)
        model.to(device).train(was_training)
    return out_file

"""Drawing predicted skeletons on images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fedpose.data.records import Skeleton


def _joint_color(name: str) -> tuple[int, int, int]:
    if name.startswith("l_"):
        return (60, 140, 255)
    if name.startswith("r_"):
        return (255, 90, 60)
    return (60, 220, 90)


def draw_skeleton(
    image: str | Path | Image.Image,
    joints: np.ndarray,
    confidence: np.ndarray,
    skeleton: Skeleton,
    out: str | Path,
    min_confidence: float = 0.0,
) -> Path:
    img = image.copy() if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    scale = max(img.size) / 256
    if scale < 1:  # draw on an upscaled copy so small images stay legible
        img = img.resize((round(img.width / scale), round(img.height / scale)), Image.BILINEAR)
        joints = joints / scale
        scale = 1.0
    draw = ImageDraw.Draw(img)
    width = max(2, round(2 * scale))
    ok = confidence >= min_confidence
    for a, b in skeleton.bones:
        if ok[a] and ok[b]:
            draw.line([tuple(joints[a]), tuple(joints[b])], fill=(255, 230, 40), width=width)
    r = max(3, round(3 * scale))
    for j, name in enumerate(skeleton.joints):
        if ok[j]:
            x, y = joints[j]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_joint_color(name), outline="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out

"""Write mmpose_pck_accuracy.json: mmpose 1.3.2's pose_pck_accuracy on seeded random heatmaps.

Not run in CI. The golden values were made with:

    python3 -m venv /tmp/mmp
    /tmp/mmp/bin/pip install numpy mmpose==1.3.2 --no-deps
    /tmp/mmp/bin/python tests/golden/make_mmpose_golden.py \
        /tmp/mmp/lib/python3.*/site-packages/mmpose

mmpose's package __init__ imports mmcv, so this loads only the two module files it needs by path
(evaluation/functional/keypoint_eval.py and codecs/utils/post_processing.py), under stub parent
packages, with stub cv2/torch modules when those are not installed (post_processing imports them
but get_heatmap_maximum uses neither).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

SEED = 20240613
OUT = Path(__file__).with_name("mmpose_pck_accuracy.json")


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)] if path else []
    sys.modules[name] = mod
    return mod


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_pose_pck_accuracy(root: Path):
    for missing in ("cv2", "torch"):
        try:
            __import__(missing)
        except ImportError:
            stub = _package(missing)
            if missing == "torch":
                stub.Tensor = object
                nn = _package("torch.nn")
                nn.functional = _package("torch.nn.functional")
                stub.nn = nn
    _package("mmpose", root)
    _package("mmpose.codecs", root / "codecs")
    utils = _package("mmpose.codecs.utils", root / "codecs" / "utils")
    post = _load(
        "mmpose.codecs.utils.post_processing", root / "codecs" / "utils" / "post_processing.py"
    )
    utils.get_heatmap_maximum = post.get_heatmap_maximum
    utils.get_simcc_maximum = post.get_simcc_maximum
    _package("mmpose.evaluation", root / "evaluation")
    _package("mmpose.evaluation.functional", root / "evaluation" / "functional")
    _load(
        "mmpose.evaluation.functional.mesh_eval",
        root / "evaluation" / "functional" / "mesh_eval.py",
    )
    ke = _load(
        "mmpose.evaluation.functional.keypoint_eval",
        root / "evaluation" / "functional" / "keypoint_eval.py",
    )
    return ke.pose_pck_accuracy


def make_groups(rng: np.random.Generator) -> list[dict]:
    """Small integer-valued heatmaps (compact JSON; ties exercise argmax's first-index rule)."""
    groups = []
    # non-square maps expose the (x, y) / (H, W) pairing of the default normaliser
    for n, k, h, w in [(6, 5, 16, 12), (4, 3, 8, 8), (3, 4, 10, 14)]:
        output = rng.integers(-4, 5, size=(n, k, h, w)).astype(np.float32)
        target = rng.integers(-4, 5, size=(n, k, h, w)).astype(np.float32)
        # peaked targets near the predictions so that some joints are right
        for i in range(n):
            for j in range(k):
                x, y = rng.integers(0, w), rng.integers(0, h)
                target[i, j, y, x] = 20.0
                px = int(np.clip(x + rng.integers(-3, 4), 0, w - 1))
                py = int(np.clip(y + rng.integers(-3, 4), 0, h - 1))
                output[i, j, py, px] = 20.0
        # maps with no positive maximum: argmax becomes (-1, -1) in mmpose
        output[0, 0] = -np.abs(output[0, 0]) - 1
        target[-1, -1] = 0.0
        mask = rng.random((n, k)) > 0.2
        custom = rng.integers(2, 30, size=(n, 2)).astype(np.float64)
        custom[0, 1] = 0.0  # a zero normaliser drops the sample
        custom[1, 0] = -5.0  # a negative one becomes 1e6
        groups.append(dict(output=output, target=target, mask=mask, custom=custom))
    return groups


def main() -> None:
    root = Path(sys.argv[1])
    pose_pck_accuracy = load_pose_pck_accuracy(root)
    rng = np.random.default_rng(SEED)
    groups = []
    for g in make_groups(rng):
        results = []
        for thr in (0.05, 0.1, 0.2, 0.5):
            for which in ("default", "custom"):
                normalize = None if which == "default" else g["custom"].copy()
                acc, avg, cnt = pose_pck_accuracy(
                    g["output"], g["target"], g["mask"], thr=thr, normalize=normalize
                )
                results.append(
                    {
                        "thr": thr,
                        "normalize": which,
                        "acc": [float(a) for a in acc],
                        "avg_acc": float(avg),
                        "cnt": int(cnt),
                    }
                )
        groups.append(
            {
                "output": g["output"].astype(int).tolist(),
                "target": g["target"].astype(int).tolist(),
                "mask": g["mask"].astype(int).tolist(),
                "custom_normalize": g["custom"].tolist(),
                "results": results,
            }
        )
    OUT.write_text(
        json.dumps(
            {"mmpose": "1.3.2", "function": "pose_pck_accuracy", "seed": SEED, "groups": groups}
        )
    )
    print(f"wrote {len(groups)} groups to {OUT}")


if __name__ == "__main__":
    main()

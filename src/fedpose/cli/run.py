"""`fedpose train`, `run`, `eval`, `predict`, `export`, `score`: training runs and what is done
with their models; each handler beside its arguments."""

from __future__ import annotations

import argparse
import math

from rich.table import Table

from fedpose.cli.common import (
    add_config,
    add_force,
    add_name,
    add_overrides,
    add_resume,
    console,
    own_folder,
    own_name,
)
from fedpose.config import ConfigError, load_config
from fedpose.data import DATASETS
from fedpose.files import check_not_an_input
from fedpose.run_dir import check_output


def _print_keypoint_ap(ap: dict[str, float], dataset: str) -> None:
    """COCO keypoint AP one value a line (`AP: 0.712`); for synth-arm, also COCO-format, why
    there is none."""
    for name, value in ap.items():
        print(f"{name}: {value:.3f}")
    if not ap and dataset == "synth-arm":
        console.print(
            "keypoint AP: not reported for synth-arm (COCO's OKS constants exist for "
            "its 17 keypoints only)"
        )


def cmd_train(args) -> int:
    from fedpose.model.io import MODEL_FILE
    from fedpose.train import train_centralized

    cfg = load_config(args.config, args.overrides + own_name(args, "train"))
    record = train_centralized(cfg, resume=args.resume, console=console, force=args.force)
    console.print(f"model: {cfg.run_dir / MODEL_FILE}")
    console.print(f"mean PCK: {record.get('pck_mean', float('nan')):.2f}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="centralized training and evaluation")
    add_config(p)
    add_resume(p)
    add_name(p, own_folder("train"))
    p.set_defaults(func=cmd_train)


def cmd_run(args) -> int:
    from fedpose.engine.runner import run_federation
    from fedpose.metrics.log import read_metrics
    from fedpose.report.compare import final_eval

    cfg = load_config(args.config, args.overrides + own_name(args, "run"))
    run_federation(cfg, resume=args.resume, console=console, force=args.force)
    last = final_eval(read_metrics(cfg.run_dir)) or {}  # the last round is always evaluated
    console.print(f"run directory: {cfg.run_dir}")
    console.print(f"mean PCK: {last.get('pck_mean', float('nan')):.2f}")
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="one federated run on the in-process engine")
    add_config(p)
    add_resume(p)
    add_name(p, own_folder("run"))
    p.set_defaults(func=cmd_run)


def cmd_eval(args) -> int:
    from fedpose.config import data_from_user
    from fedpose.data import load_split
    from fedpose.engine.evaluate import evaluate_model
    from fedpose.metrics.coco_ap import has_keypoint_ap, split_ap
    from fedpose.metrics.pck import grouped_table
    from fedpose.model.inference import resolve_device
    from fedpose.model.io import load_model

    model, cfg, skeleton = load_model(args.checkpoint)
    cfg = data_from_user(cfg, args.overrides)  # the model file's own paths are never used
    if args.dump and cfg.data.dataset != "coco":
        raise ConfigError(f"--dump writes COCO results; the model's data is {cfg.data.dataset}")
    if args.dump:
        check_output(args.dump, "eval", args.force)  # before the evaluation, not after
    records, _ = load_split(cfg.data, args.split)
    ev = evaluate_model(
        model,
        records,
        skeleton,
        resolve_device(cfg.train.device),
        input_size=cfg.data.input_size,
        flip_test=cfg.train.flip_test,
    )
    result = ev["result"]
    table = Table(title=f"{skeleton.name}: {len(records)} {args.split} records")
    table.add_column("joint")
    table.add_column("PCK (%)", justify="right")
    table.add_column("count", justify="right")
    for joint, value in result.per_joint.items():
        table.add_row(joint, f"{value:.2f}", str(result.counts[joint]))
    console.print(table)
    rows = grouped_table(result, skeleton)
    if rows:
        console.print("  ".join(f"{part} {value:.2f}" for part, value in rows))
    side = cfg.data.input_size // 4
    print(
        f"heatmap accuracy: {ev['heatmap_acc']:.2f} % (SimpleBaseline's: argmax within "
        f"{side / 20:g} px of the target's on the {side}x{side} heatmaps)"
    )
    ap = {}
    if cfg.data.dataset == "coco" and has_keypoint_ap(skeleton):
        ap = split_ap(records, ev["preds"], ev["confidence"], cfg.data, args.split)
    _print_keypoint_ap(ap, cfg.data.dataset)
    if args.dump:
        from fedpose.metrics.coco_ap import write_split_results

        out = write_split_results(
            args.dump, records, ev["preds"], ev["confidence"], cfg.data, args.split
        )
        console.print(f"wrote {out}", markup=False, highlight=False)
    print(f"mean PCK: {result.mean:.2f}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--dump",
        default=None,
        metavar="RESULTS.json",
        help="coco: also write the predictions as a COCO keypoint results file",
    )
    add_force(p, "a --dump file in a folder another command made")
    add_overrides(p, "e.g. -c data.root=/path/to/lsp")
    p.set_defaults(func=cmd_eval)


def cmd_predict(args) -> int:
    check_not_an_input(args.out, args.checkpoint, args.image)
    check_output(args.out, "predict", args.force)  # before torch loads
    from fedpose.model.inference import predict_image
    from fedpose.model.io import load_model
    from fedpose.report.draw import draw_skeleton

    model, cfg, skeleton = load_model(args.checkpoint)
    joints, confidence = predict_image(model, args.image, cfg.data.input_size, skeleton)
    draw_skeleton(args.image, joints, confidence, skeleton, args.out)
    for name, (x, y), c in zip(skeleton.joints, joints.tolist(), confidence.tolist(), strict=True):
        console.print(f"{name:>12}: ({x:7.1f}, {y:7.1f})  confidence {c:.2f}")
    console.print(f"wrote {args.out}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict the keypoints of one image and draw them")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    add_force(p, "an --out file in a folder another command made")
    p.set_defaults(func=cmd_predict)


def cmd_export(args) -> int:
    check_not_an_input(args.onnx, args.checkpoint)
    check_output(args.onnx, "export", args.force)  # before torch loads
    from fedpose.model.conventions import describe_model
    from fedpose.model.export import ONNX_OPSET, export_onnx
    from fedpose.model.io import load_any_model

    model, cfg, skeleton = load_any_model(args.checkpoint)
    size = cfg.data.input_size
    conventions = describe_model(cfg, skeleton)
    out = export_onnx(model, size, args.onnx, skeleton, conventions=conventions)
    console.print(
        f"image: batch x 3 x {size} x {size} -> heatmaps: batch x "
        f"{skeleton.num_joints} x {size // 4} x {size // 4}, ONNX opset {ONNX_OPSET}"
    )
    print(f"wrote {out}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model file (or a run's checkpoint) as ONNX")
    p.add_argument(
        "checkpoint",
        help="model.safetensors, or RUN/checkpoints/last.safetensors (with RUN/config.json)",
    )
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    add_force(p, "an --onnx file in a folder another command made")
    p.set_defaults(func=cmd_export)


def cmd_model_from_checkpoint(args) -> int:
    check_not_an_input(args.out, args.checkpoint)
    check_output(args.out, "model-from-checkpoint", args.force)  # before torch loads
    from fedpose.model.io import model_from_checkpoint, save_model

    weights, cfg, skeleton = model_from_checkpoint(args.checkpoint, args.config)
    save_model(args.out, weights, cfg, skeleton)
    print(f"wrote {args.out}")
    return 0


def add_model_from_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-from-checkpoint",
        help="write a run's checkpoint as a model file that eval, predict and export read",
    )
    p.add_argument("checkpoint", help="RUN/checkpoints/last.safetensors (or previous)")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors")
    p.add_argument(
        "--config",
        default=None,
        metavar="CONFIG.json",
        help="the run's config.json (default: two folders above the checkpoint)",
    )
    add_force(p, "an --out file in a folder another command made")
    p.set_defaults(func=cmd_model_from_checkpoint)


def cmd_score(args) -> int:
    from fedpose.data import FileOptions
    from fedpose.metrics.score_file import score_file, score_table

    if args.alpha is not None and not (math.isfinite(args.alpha) and 0 < args.alpha <= 1):
        raise ValueError(f"--alpha {args.alpha!r} is out of range; allowed: (0, 1]")
    options = FileOptions(split=args.split, labels=args.labels, headboxes=args.headboxes)
    scored = score_file(args.dataset, args.root, args.pred, args.ann, options, args.alpha)
    console.print(score_table(scored.result, scored.skeleton, scored.num_records, args.alpha))
    _print_keypoint_ap(scored.ap, args.dataset)
    print(f"mean PCK: {scored.result.mean:.2f}")
    return 0


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a predictions file with the dataset's metric")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--root", required=True, help="dataset folder (images)")
    p.add_argument("--ann", default=None, help="annotation file (mpii, coco)")
    p.add_argument(
        "--pred",
        required=True,
        help="JSON: image file name -> [[x, y], ...]; coco: or a COCO keypoint results list",
    )
    p.add_argument("--headboxes", default=None, help="mpii: gt_valid.mat")
    p.add_argument("--split", default="test", choices=["train", "test", "all"], help="lsp's split")
    p.add_argument("--labels", default="pc", choices=["pc", "oc"], help="lsp labels")
    p.add_argument("--alpha", type=float, default=None, help="threshold (default: standard)")
    p.set_defaults(func=cmd_score)

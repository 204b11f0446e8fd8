"""The command line: scoring prediction files, clean errors, and a tiny train -> eval -> predict."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fedtiny import tiny_cli_args

from fedpose.cli import main
from fedpose.data.coco import load_coco
from fedpose.data.lsp import load_lsp


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("source", ["tests-data", pytest.param("full", marks=pytest.mark.slow)])
def test_score_lsp_ground_truth_is_100_and_offsets_lower_it(source, request, tmp_path, capsys):
    # the 40-image copy has no standard split: score all of it; the full dataset: its test half
    if source == "full":
        root, split = request.getfixturevalue("datasets") / "lsp", []
    else:
        root, split = request.getfixturevalue("lsp_dir"), ["--split", "all"]
    records = load_lsp(root, "all" if split else "test")
    pred = {r.record_id: r.joints.tolist() for r in records}
    (tmp_path / "gt.json").write_text(json.dumps(pred))
    assert (
        main(
            [
                "score",
                "--dataset",
                "lsp",
                "--root",
                str(root),
                *split,
                "--pred",
                str(tmp_path / "gt.json"),
            ]
        )
        == 0
    )
    assert _last_line(capsys) == "mean PCK: 100.00"

    # move every joint of the first half of the images 0.3 torso lengths away: those miss
    shifted = {}
    for i, r in enumerate(records):
        torso = np.linalg.norm(r.joints[9] - r.joints[2])
        offset = 0.3 * torso if i < len(records) // 2 else 0.0
        shifted[r.record_id] = (r.joints + [offset, 0]).tolist()
    (tmp_path / "half.json").write_text(json.dumps(shifted))
    main(
        [
            "score",
            "--dataset",
            "lsp",
            "--root",
            str(root),
            *split,
            "--pred",
            str(tmp_path / "half.json"),
        ]
    )
    assert _last_line(capsys) == "mean PCK: 50.00"


def test_score_coco_and_missing_prediction(coco_dir, tmp_path, capsys):
    root = coco_dir
    ann = root / "test_coco.json"
    records = load_coco(ann, root)
    per_image: dict[str, list] = {}
    for r in records:
        per_image.setdefault(r.image.name, []).append(r.joints.tolist())
    (tmp_path / "p.json").write_text(json.dumps(per_image))
    assert (
        main(
            [
                "score",
                "--dataset",
                "coco",
                "--root",
                str(root),
                "--ann",
                str(ann),
                "--pred",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert _last_line(capsys) == "mean PCK: 100.00"
    first = records[0].image.name
    del per_image[first]
    (tmp_path / "p.json").write_text(json.dumps(per_image))
    assert (
        main(
            [
                "score",
                "--dataset",
                "coco",
                "--root",
                str(root),
                "--ann",
                str(ann),
                "--pred",
                str(tmp_path / "p.json"),
            ]
        )
        == 2
    )
    out = capsys.readouterr()
    assert f"p.json [record {first}]: no prediction for this image" in out.err


def test_inspect_malformed_is_one_error_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    code = main(
        [
            "data",
            "inspect",
            "--dataset",
            "coco",
            "--root",
            str(tmp_path),
            "--ann",
            str(tmp_path / "bad.json"),
        ]
    )
    assert code == 2
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.json" in lines[0]


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fed]\nrouns = 3\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown config key 'fed.rouns'" in capsys.readouterr().err


def test_train_eval_predict_roundtrip(tmp_path, synth_dir, capsys):
    args = [
        "-c",
        f"out_dir={tmp_path}",
        "-c",
        "name=t",
        "-c",
        f"data.root={synth_dir}",
        "-c",
        "data.input_size=32",
        "-c",
        "model.width=4",
        "-c",
        "model.deconv_filters=8",
        "-c",
        "train.epochs=1",
        "-c",
        "train.batch_size=8",
        "-c",
        "train.flip_test=false",
    ]
    assert main(["train", "configs/demo.toml", *args]) == 0
    trained = _last_line(capsys)
    model = tmp_path / "t" / "model.safetensors"
    assert model.exists()
    # the data to evaluate on is named here: a model file's own paths are never used
    assert main(["eval", str(model), "-c", f"data.root={synth_dir}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == trained  # same weights, same test split, same number
    row = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    shown = [line for line in out if line.startswith("heatmap accuracy: ")]
    assert shown and shown[0].startswith(f"heatmap accuracy: {row['heatmap_acc']:.2f} % ")
    image = sorted((synth_dir / "images").iterdir())[0]
    out = tmp_path / "pred.png"
    assert main(["predict", str(model), str(image), "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 0


def test_train_on_one_clients_share(tmp_path, synth_dir, capsys):
    # the local-only lower bound: centralized training on client 1's share of the view split
    sets = tiny_cli_args(tmp_path, synth_dir, "train.epochs=1", "fed.num_clients=4")
    assert main(["train", "configs/demo.toml", *sets, "-c", "train.client=1"]) == 0
    out = capsys.readouterr().out
    shown = re.search(r"(\d+) train \(client 1 of 4 only\), (\d+) test", out)
    assert shown, out
    assert main(["train", "configs/demo.toml", *sets, "-c", "name=all"]) == 0
    everything = re.search(r"(\d+) train, (\d+) test", capsys.readouterr().out)
    assert 0 < int(shown[1]) < int(everything[1]) and shown[2] == everything[2]
    row = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["heatmap_acc"] <= 100 and 0 <= row["pck_mean"] <= 100
    assert main(["train", "configs/demo.toml", *sets, "-c", "train.client=4"]) == 2
    assert "train.client: 4 is not allowed" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "no/such/model.pt"], ["run", "no/such/config.toml"]])
def test_missing_files_are_clear_errors(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_pretrained_flag_is_a_model_override():
    from fedpose.cli import build_parser

    args = build_parser().parse_args(["train", "c.toml", "-c", "seed=1", "--pretrained", "r18.pt"])
    assert args.overrides == ["seed=1", "model.pretrained=r18.pt"]

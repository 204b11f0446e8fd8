"""A tiny federation for tests: a few synth-arm images, a very narrow PoseResNet."""

from __future__ import annotations

from pathlib import Path

from fedpose.config import Config, load_config


def tiny_config(tmp_path: Path, data_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "name=tiny",
            f"out_dir={tmp_path / 'runs'}",
            "data.dataset=synth-arm",
            f"data.root={data_dir}",
            "data.synth_n=48",
            "data.synth_size=64",
            "data.input_size=32",
            "data.test_fraction=0.25",
            "model.depth=18",
            "model.width=4",
            "model.deconv_filters=8",
            "train.batch_size=8",
            "train.lr=0.01",
            "train.flip_test=false",
            "fed.rounds=2",
            "fed.num_clients=4",
            "fed.partition=attribute",
            "fed.partition_attr=view",
            "fed.local_steps=1",
            "fed.eval_every=1",
            *overrides,
        ],
    )


def tiny_cli_args(out_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    """`-c` arguments that make configs/demo.toml a short run named `t` of a tiny model on two
    clients (`fed.rounds=1` unless overridden)."""
    sets = [
        f"out_dir={out_dir}",
        "name=t",
        f"data.root={data_dir}",
        "data.input_size=32",
        "model.width=4",
        "model.deconv_filters=8",
        "train.batch_size=8",
        "train.flip_test=false",
        "fed.rounds=1",
        "fed.local_steps=1",
        "fed.num_clients=2",
        *overrides,
    ]
    return [arg for value in sets for arg in ("-c", value)]

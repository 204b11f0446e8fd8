"""What every command group of the command line shares: the consoles, the config and
override arguments, the method names, the exit-message constants.

Only light modules at the top of the command-line modules: `--help`, `--version` and argument
errors must not wait for torch (2-11 s); each command imports what it needs.
tests/test_cli_light.py checks it."""

from __future__ import annotations

import argparse

from fedpose.version import plain_console

console = plain_console()
err_console = plain_console(stderr=True, soft_wrap=True)
METHODS = "fedavg,fedprox,fedbn,feddyn,fedaw,fedgh"
METHOD_CHOICES = (
    "fedavg",
    "fedprox",
    "fedbn",
    "feddyn",
    "fedaw",
    "fedgh",
    "fedgh-noproj",
    "fedgh-noaw",
    "fedavg-clip",
    "median",
    "trimmed-mean",
    "scaffold",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
)
RUN_INTERRUPTED = "the last checkpoint is kept; rerun with --resume"
FLOWER_INTERRUPTED = "every Flower process was stopped"


def add_overrides(
    p: argparse.ArgumentParser, help_text: str = "override a config value, e.g. -c fed.rounds=5"
) -> None:
    p.add_argument(
        "-c",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="TOML config file")
    add_overrides(p)
    p.add_argument(
        "--pretrained",
        type=pretrained,
        dest="overrides",
        action="append",
        metavar="PATH",
        help="start the backbone from a torchvision-format ResNet "
        "state dict (same as -c model.pretrained=PATH)",
    )


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (start over when there is none)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a checkpoint of another method, seed or config; "
        "write into a run folder another command made",
    )


def add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name", default=None, help="run folder name under out_dir (default: the config's name)"
    )


def name_override(args) -> list[str]:
    """--name NAME as the override it stands for."""
    return [f"name={args.name}"] if args.name else []


def pretrained(path: str) -> str:
    return f"model.pretrained={path}"


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_flower_run(p: argparse.ArgumentParser, rounds: int) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="TOML config file (default: a tiny synth-arm federation)",
    )
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=rounds)
    add_overrides(p)


def method_names() -> tuple[str, ...]:
    # fl.strategies.STRATEGY_NAMES is the one list, but importing it loads torch;
    # tests/test_cli_light.py checks that this copy is the same
    return METHOD_CHOICES

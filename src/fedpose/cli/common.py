"""What every command group of the command line shares: the consoles, the config and
override arguments, the method names, the exit-message constants.

Only light modules at the top of the command-line modules: `--help`, `--version` and argument
errors must not wait for torch (2-11 s); each command imports what it needs.
tests/test_cli_light.py checks it."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpose.config import load_config
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
        "write into a run folder another command made (--name)",
    )


def add_name(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--name", default=None, help=f"folder name under out_dir (default: {default})")


def own_folder(command: str) -> str:
    """--name's default in words, for a command whose folder own_name chooses."""
    return f"the config's name; NAME-{command} when another command made that folder"


def add_force(p: argparse.ArgumentParser, what: str = "an output another command made") -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite {what}")


def name_override(args) -> list[str]:
    """--name NAME as the override it stands for."""
    name = getattr(args, "name", None)  # commands without --name: `-c name=` only
    return [f"name={name}"] if name else []


def names_the_run(overrides: list[str]) -> bool:
    """Whether the overrides (`-c name=...`, or --name's) name the run folder."""
    return any(item.split("=", 1)[0].strip() == "name" for item in overrides)


def own_name(args, command: str, suffix: str | None = None) -> list[str]:
    """The name overrides of a command that makes a run folder (fedpose.run_dir.default_name):
    --name's, or none when `-c name=` names the folder; else none when the config's own folder
    is free or this command's, and `name=<name>-<suffix>` when another command made it (said on
    the console: `fedpose train configs/demo.toml` after `make demo` writes runs/demo-train)."""
    from fedpose.run_dir import default_name, owner

    overrides = args.overrides + name_override(args)
    if names_the_run(overrides):
        return name_override(args)
    cfg = load_config(args.config, overrides)
    name = default_name(cfg.out_dir, cfg.name, command, suffix)
    if name == cfg.name:
        return []
    console.print(
        f"{cfg.run_dir} holds the results of `fedpose {owner(cfg.run_dir)}`: `fedpose "
        f"{suffix or command}` writes {Path(cfg.out_dir) / name} (--name chooses the folder)",
        markup=False,
        highlight=False,
    )
    return [f"name={name}"]


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

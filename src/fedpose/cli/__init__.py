"""fedpose command line: train, run, compare, report, family, eval, predict, export, score, data,
bench, flower-demo, flower-sim, flower-config.

Argument parsing and printing live here; the library raises exceptions and returns values.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import warnings

from fedpose.cli import bench, data, flower, report, run
from fedpose.cli.common import METHOD_CHOICES, RUN_INTERRUPTED, console, err_console
from fedpose.config import ConfigError
from fedpose.data.records import DatasetError
from fedpose.tools import ToolError
from fedpose.version import version_line


# Built once per process: its 18 commands (28 parsers with the groups' own) take ~12 ms to
# build, and main() is also called many times in one process (the tests, a notebook); parsing
# leaves the parser unchanged.
@functools.cache
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpose", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    run.add_train(sub)
    run.add_run(sub)
    report.add_compare(sub)
    report.add_report(sub)
    report.add_family(sub)
    run.add_eval(sub)
    run.add_predict(sub)
    run.add_export(sub)
    run.add_model_from_checkpoint(sub)
    run.add_score(sub)
    data.add_data(sub)
    bench.add_bench(sub)
    flower.add_flower_demo(sub)
    flower.add_flower_sim(sub)
    flower.add_flower_config(sub)
    flower.add_flower_pull(sub)
    report.add_watch(sub)
    bench.add_sketch_study(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Data warnings as one `warning:` line; others as Python prints them."""
    from fedpose.data.records import DatasetWarning

    if issubclass(category, DatasetWarning):
        err_console.print(f"warning: {message}", markup=False, highlight=False)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _federation_error() -> type[BaseException] | tuple:
    """fl.server's FederationError once that module is loaded (only then can it be raised);
    importing it up front would load torch for `--help`."""
    module = sys.modules.get("fedpose.fl.server")
    return getattr(module, "FederationError", ())


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    # reports name the command that wrote them
    args.command_line = shlex.join(["fedpose", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (DatasetError, ConfigError, ToolError, OSError, ValueError) as e:
        # the one error path: one line naming the file and record (DatasetError does), exit 2;
        # no markup (messages hold "[record ...]") and no wrapping
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 2
    except _federation_error() as e:  # the input was fine; the run itself failed
        err_console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print(f"interrupted: {getattr(args, 'interrupted', RUN_INTERRUPTED)}")
        return 130


__all__ = ["METHOD_CHOICES", "build_parser", "console", "err_console", "main"]

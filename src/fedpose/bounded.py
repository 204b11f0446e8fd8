"""The one way fedpose parses JSON and TOML from a file: bounded nesting, one-line errors.

Python's `json` and `tomllib` parse nested arrays and objects recursively, so a file of 100 000
`[` ends in a RecursionError (a traceback) instead of a message. Every reader (model and
checkpoint headers, configs, metrics.jsonl rows, annotation files, reports, run folders) parses
through here: the nesting depth is counted first, outside strings (dotted TOML keys included),
and anything deeper than `MAX_DEPTH` is refused with a ParseError (a ValueError) naming the
source. No fedpose file nests deeper than a handful of levels.

The implementation lives in config.py, the bottom of the package (it reads TOML and may import
nothing of fedpose); this module is its name for every other reader.
"""

from fedpose.config import (
    MAX_DEPTH,
    ParseError,
    loads_json,
    loads_toml,
    nesting_depth,
    read_json,
    read_toml,
)

__all__ = [
    "MAX_DEPTH",
    "ParseError",
    "loads_json",
    "loads_toml",
    "nesting_depth",
    "read_json",
    "read_toml",
]

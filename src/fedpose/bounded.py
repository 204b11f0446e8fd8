"""The one way fedpose parses JSON and TOML from a file: bounded nesting, one-line errors.

Python's `json` and `tomllib` parse nested arrays and objects recursively, so a file of 100 000
`[` ends in a RecursionError (a traceback) instead of a message. Every reader (model and
checkpoint headers, configs, metrics.jsonl rows, annotation files, reports) parses through
here: the nesting depth is counted first, outside strings, and anything deeper than
`MAX_DEPTH` is refused with a ValueError naming the source. No fedpose file nests deeper
than a handful of levels.

This module imports nothing of fedpose, so config.py and every layer may use it.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_DEPTH = 64
# strings removed before counting brackets: a "[" inside a string is no nesting
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_TOML_STRING = re.compile(
    r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*', re.S
)
_BRACKET = re.compile(r"[\[\]{}]")
# a TOML dotted key (a.b.c = 1, [a.b.c]) nests one table per dot
_DOTTED = re.compile(r"(?:[A-Za-z0-9_-]*\s*\.\s*){" + str(MAX_DEPTH + 1) + ",}")


class ParseError(ValueError):
    """A JSON or TOML text that cannot be read: the message names its source."""


def nesting_depth(text: str, strings: re.Pattern[str] = _JSON_STRING) -> int:
    """The deepest bracket nesting of `text` outside strings (an upper bound for TOML)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(strings.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _check_depth(text: str, source: object, strings: re.Pattern[str]) -> None:
    # a quick bound first: only a text with many brackets can be too deep
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text, strings) > MAX_DEPTH:
        raise ParseError(f"{source}: nested deeper than {MAX_DEPTH} levels")


def loads_json(
    text: str | bytes,
    source: object,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """`json.loads(text)`, or ParseError naming `source` (a file, `file [line N]`, ...)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ParseError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    _check_depth(text, source, _JSON_STRING)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise ParseError(f"{source}: not valid JSON: {e}") from None
    except RecursionError:  # a backstop: the depth check should have caught it
        raise ParseError(f"{source}: nested too deeply") from None


def read_json(path: str | Path, object_pairs_hook=None) -> Any:
    """The JSON value of a file, or ParseError / OSError naming it."""
    path = Path(path)
    return loads_json(path.read_bytes(), path, object_pairs_hook)


def loads_toml(text: str, source: object) -> dict:
    """`tomllib.loads(text)`, or ParseError naming `source`."""
    _check_depth(text, source, _TOML_STRING)
    if text.count(".") > MAX_DEPTH and _DOTTED.search(_TOML_STRING.sub("", text)):
        raise ParseError(f"{source}: a dotted key nested deeper than {MAX_DEPTH} levels")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ParseError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise ParseError(f"{source}: nested too deeply") from None


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads_toml(text, path)

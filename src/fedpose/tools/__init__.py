"""Tooling around the library: the Flower loopback demo (a process supervisor) and the
benchmarks behind `fedpose bench`. The library (data, model, metrics, fl, engine, report) never
imports from here."""

from __future__ import annotations


class ToolError(RuntimeError):
    """A tool could not do its job for a reason the user can fix (the message says which)."""

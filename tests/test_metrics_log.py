"""The JSON-lines reader every metrics consumer uses."""

from __future__ import annotations

import pytest

from fedpose.metrics.log import read_jsonl, read_metrics


def test_rows_in_order_blank_lines_skipped_missing_file_empty(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n\n{"round": 2, "pck_mean": null}\n')
    assert read_metrics(tmp_path) == [{"round": 1}, {"round": 2, "pck_mean": None}]


def test_a_line_still_being_written_is_left_out(tmp_path):
    path = tmp_path / "timing.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "los')
    assert read_jsonl(path) == [{"round": 1}]


def test_a_damaged_line_before_the_end_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": \n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl \[line 2\]: not valid JSON"):
        read_jsonl(path)

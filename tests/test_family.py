"""`fedpose family`: a family of comparisons across reports' summary.json, Holm-corrected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedpose.cli import main
from fedpose.report.family import Member, compare_family
from fedpose.report.stats import holm

ALPHA = 0.05
# standardised residuals (mean 0, sample std 1): the differences of a comparison are
# t·s/√n + s·Z, so that its paired t-test has exactly the p-value it is built for
Z = np.array([-1.2, -0.4, 0.1, 0.5, 1.0])
Z = (Z - Z.mean()) / Z.std(ddof=1)


def _summary(path: Path, arms: dict[str, dict[int, float]]) -> Path:
    """A summary.json of the shape `fedpose report` writes (only "arms" is read)."""
    body = {
        label: {"seeds": sorted(s), "scores": {str(k): v for k, v in s.items()}}
        for label, s in arms.items()
    }
    path.write_text(json.dumps({"metric": "mean PCK", "arms": body, "differences": {}}))
    return path


def _built_for(p: float, sign: float = 1.0, sd: float = 2.0) -> np.ndarray:
    """Five paired differences whose two-sided paired t-test p-value is `p`."""
    t = stats.t.isf(p / 2, len(Z) - 1)
    return sign * (t * sd / np.sqrt(len(Z)) + sd * Z)


def _pair(path: Path, diffs: np.ndarray, extra_seed: bool = False) -> Path:
    base = {seed: 60.0 + 3 * seed for seed in range(len(diffs))}
    arm = {seed: base[seed] + d for seed, d in enumerate(diffs)}
    if extra_seed:  # a seed the baseline lacks: not paired, not used
        arm[len(diffs)] = 99.0
    baseline = dict(reversed(base.items()))  # the file's order is not the seeds' order
    return _summary(path, {"gh": arm, "yogi": baseline, "other": base})


def test_the_family_matches_scipy_and_holms_steps(tmp_path):
    # built p-values 0.022, 0.5, 0.001, 0.02: Holm multiplies the sorted ones by 4, 3, 2, 1
    # (0.004, 0.06, 0.044, 0.5) and makes them monotone: C's 0.044 is raised to B's 0.06, so C
    # is not resolved although 2 · 0.022 < α
    built = {"C": (0.022, 1), "A": (0.5, 1), "D": (0.001, -1), "B": (0.02, 1)}
    holm_by_hand = {"D": 0.004, "B": 0.06, "C": 0.06, "A": 0.5}
    members = []
    for name, (p, sign) in built.items():
        path = _pair(tmp_path / f"{name}.json", _built_for(p, sign), extra_seed=name == "B")
        members.append(Member(name, path, "gh", "yogi"))

    results = compare_family(members, ALPHA)

    assert [r.name for r in results] == list(built)  # the order given
    for r in results:
        scores = json.loads(r.summary.read_text())["arms"]
        a = np.array([scores["gh"]["scores"][str(s)] for s in range(5)])
        b = np.array([scores["yogi"]["scores"][str(s)] for s in range(5)])
        d = a - b
        assert r.n == 5
        assert r.mean == pytest.approx(d.mean())
        assert r.p == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
        assert r.p == pytest.approx(built[r.name][0], rel=1e-6)
        sem = stats.sem(d)
        assert r.interval == pytest.approx(stats.t.interval(0.95, 4, d.mean(), sem))
        assert r.bonferroni == pytest.approx(stats.t.interval(1 - ALPHA / 4, 4, d.mean(), sem))
        assert r.p_holm == pytest.approx(holm_by_hand[r.name], rel=1e-6)
        assert r.resolved == (r.name == "D")
        # the Bonferroni interval excludes zero only where Holm resolves
        if r.bonferroni[0] > 0 or r.bonferroni[1] < 0:
            assert r.resolved
    assert results[2].mean < 0 and results[2].interval[1] < 0  # D: the arm is worse


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["family", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_prints_writes_and_rewrites_its_own_output(tmp_path, capsys):
    one = _pair(tmp_path / "one.json", _built_for(0.001))
    two = _pair(tmp_path / "two.json", _built_for(0.3))
    out = tmp_path / "family" / "primary.md"
    argv = ["--pair", "gh:yogi", f"one={one}", f"two={two}:other:yogi", "--out", out]

    code, printed, err = _run(argv, capsys)

    assert code == 0, err
    rows = [line for line in printed.splitlines() if line.startswith(("| one", "| two"))]
    assert rows[0].startswith("| one | gh − yogi | 5 |") and rows[0].endswith("| yes |")
    # the per-comparison pair: other and yogi hold the same scores
    assert rows[1].startswith("| two | other − yogi | 5 | +0.00 |")
    assert "Bonferroni 97.5 % interval" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert [c["resolved"] for c in record["comparisons"]] == [True, False]
    assert record["comparisons"][0]["p_holm"] == pytest.approx(2 * 0.001, rel=1e-6)
    assert out.read_text().splitlines()[0].startswith("# ")
    assert _run(argv, capsys)[0] == 0  # its own output: rewritten

    notes = tmp_path / "notes.md"
    notes.write_text("## Reading\n\nwhat the table supports\n")
    code, printed, err = _run(argv + ["--title", "Primary family", "--notes", notes], capsys)
    assert code == 0, err
    page = out.read_text()
    assert page.startswith("# Primary family\n") and "# Primary family" in printed
    assert page.index("| one |") < page.index("## Reading") and "what the table supports" in page


@pytest.mark.parametrize("foreign", ["primary.md", "primary.json"])
def test_out_never_replaces_a_file_it_did_not_write_unless_forced(tmp_path, capsys, foreign):
    summary = _pair(tmp_path / "s.json", _built_for(0.01))
    (tmp_path / foreign).write_text("notes of my own\n")
    argv = ["--pair", "gh:yogi", f"s={summary}", "--out", tmp_path / "primary.md"]

    code, _, err = _run(argv, capsys)

    assert code == 2
    assert err.startswith("error: ") and str(tmp_path / foreign) in err
    assert (tmp_path / foreign).read_text() == "notes of my own\n"
    assert not (tmp_path / "primary.md").exists() or foreign == "primary.md"
    assert _run([*argv, "--force"], capsys)[0] == 0
    assert (tmp_path / foreign).read_text() != "notes of my own\n"


BAD = {  # file text -> what the error line names
    "missing arm": ({"arms": {"gh": {"scores": {"0": 1.0, "1": 2.0}}}}, "no arm 'yogi'"),
    "one seed": (
        {"arms": {"gh": {"scores": {"0": 1.0}}, "yogi": {"scores": {"0": 2.0, "1": 3.0}}}},
        "[arms.gh, arms.yogi]: 1 paired seed",
    ),
    "malformed JSON": ('{"arms": {"gh": ', "not valid JSON"),
    "arms a list": ({"arms": ["gh", "yogi"]}, 'no "arms" object'),
    "score as text": (
        {"arms": {"gh": {"scores": {"0": "71.5"}}, "yogi": {"scores": {}}}},
        "[arms.gh.scores.0]: '71.5' is not a seed's score",
    ),
    "seed not a number": (
        {"arms": {"gh": {"scores": {"s0": 1.0}}, "yogi": {"scores": {}}}},
        "[arms.gh.scores.s0]",
    ),
    "differences overflow": (
        {
            "arms": {
                "gh": {"scores": {"0": 1.7e308, "1": -1.7e308}},
                "yogi": {"scores": {"0": -1.7e308, "1": 1.7e308}},
            }
        },
        "[arms.gh, arms.yogi]: the paired test is not finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_summaries_are_one_error_line_naming_the_file(tmp_path, capsys, case):
    content, message = BAD[case]
    path = tmp_path / "bad_summary.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))

    code, printed, err = _run(["--pair", "gh:yogi", f"x={path}"], capsys)

    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}")
    assert message in err


def test_an_arm_compared_with_itself_is_refused(tmp_path, capsys):
    path = _pair(tmp_path / "one.json", _built_for(0.01))
    code, printed, err = _run(["--pair", "gh:gh", f"one={path}"], capsys)
    assert code == 2 and printed == "" and "'gh' compared with itself" in err


def test_holm_refuses_a_missing_p_value():
    with pytest.raises(ValueError, match="nan"):
        holm({"a": 0.001, "b": math.nan, "c": 0.02})


def test_a_summary_whose_name_holds_colons_is_read_as_one_path(tmp_path, capsys):
    summary = _pair(tmp_path / "run:a:b.json", _built_for(0.01))
    code, printed, err = _run(["--pair", "gh:yogi", f"one={summary}"], capsys)
    assert code == 0, err
    assert any(line.startswith("| one | gh − yogi | 5 |") for line in printed.splitlines())
    # with its own pair after it, the path is everything before the last two colons
    code, printed, err = _run([f"one={summary}:gh:yogi"], capsys)
    assert code == 0, err
    # a mistyped name has two readings, neither a file: both are named
    code, printed, err = _run(["--pair", "gh:yogi", f"one={tmp_path}/run:a:b.jsn"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "neither" in err and "run:a:b.jsn" in err and f"'{tmp_path}/run'" in err

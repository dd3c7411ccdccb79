"""The paper's numbers are golden: improvement statistics (Fig. 3) and Table 1 reproduce from counts."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from tomtransfer.shared import analysis
from tomtransfer.shared.metrics import Counts, aggregate, bridging, classify, improvement, js_divergence, scenario_result, unstable
from tomtransfer.shared.scenarios import default_catalog
from tomtransfer.shared.stats import pgg_analysis, table1_ztest

PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper-results" / "in_sample_cooperation_counts.csv"
TABLE1 = Path(__file__).parent / "data" / "table1_paper.csv"


@pytest.fixture(scope="module")
def paper():
    return analysis.analyze_counts(analysis.read_counts(PAPER, default_catalog().games), n_resamples=1000)


def test_golden_paper_improvement(paper):
    o = paper["overall"]
    assert o["n"] == 20
    assert round(o["mean"], 2) == 46.26
    assert round(o["median"], 2) == 32.33
    assert round(o["sd"], 2) == 48.60
    assert round(o["min"], 2) == -25.00 and round(o["max"], 2) == 200.00
    assert math.isclose(o["se"], o["sd"] / math.sqrt(20))
    assert o["ci95"][0] < o["mean"] < o["ci95"][1]
    cls = {s["id"]: s["class"] for s in paper["scenarios"]}
    assert cls["team_prison"] == cls["friendsharing_prison"] == "exacerbation"
    assert cls["team_delight"] == cls["friendsharing_snowdrift"] == "overcorrection"
    assert paper["classes"] == {"exacerbation": 2, "partial": 16, "overcorrection": 2, "undefined": 0}


def test_unstable_flags_mark_small_teacher_base_gaps(paper):
    flags = {s["id"]: s["unstable"] for s in paper["scenarios"]}
    # team_delight: base 237 vs teacher 230 of 300 - a gap well inside noise; IR_prison: 254 vs 77.
    assert flags["team_delight"] and not flags["IR_prison"]
    for s in paper["scenarios"]:
        if not s["unstable"]:
            lo, hi = s["ci95"]
            assert lo <= s["improvement"] <= hi


def test_group_means_are_means_of_scenarios(paper):
    by_game = paper["by_game"]
    for game, agg in by_game.items():
        vals = [s["improvement"] for s in paper["scenarios"] if s["id"].endswith("_" + game)]
        assert agg["n"] == 5 and math.isclose(agg["mean"], np.mean(vals))


def test_improvement_and_classes():
    assert improvement(0.5, 0.75, 1.0) == 50
    assert classify(improvement(0.5, 0.4, 1.0)) == "exacerbation"
    assert classify(improvement(0.5, 1.2, 1.0)) == "overcorrection"
    assert improvement(0.5, 0.7, 0.5) is None and classify(None) == "undefined"
    assert bridging(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert js_divergence([1, 0], [1, 0]) == 0 and js_divergence([1, 0], [0, 1]) == pytest.approx(1)
    assert unstable(150, 300, 152, 300) and not unstable(250, 300, 50, 300)


def test_counts_are_checked():
    with pytest.raises(ValueError):
        Counts("x", samples=10, c_base=11, c_ft=0, c_teacher=0)
    c = Counts("x", samples=10, c_base=2, c_ft=5, c_teacher=8, valid_base=4, valid_ft=10, valid_teacher=10)
    assert c.rate("base") == 0.5  # rates over valid answers
    assert scenario_result(c, 200).improvement == pytest.approx((0.5 - 0.5) / (0.8 - 0.5) * 100)


def test_aggregate_of_nothing_and_of_one():
    assert aggregate([None]).n == 0
    one = aggregate([5.0])
    assert one.mean == 5 and one.sd is None and one.ci95 is None


def test_golden_table1():
    rows = list(csv.DictReader(open(TABLE1)))
    assert len(rows) == 20
    for r in rows:
        n = int(r["samples"])
        t = table1_ztest(f"{r['context']}_{r['game']}", int(r["C_normal"]), n, int(r["C_doubled"]), n)
        assert abs(t.z - float(r["paper_z"])) <= 0.0051, r
        assert abs(t.p_value - float(r["paper_p"])) <= 0.0051 + 1e-9, r
        assert t.difference == pytest.approx(t.p_doubled - t.p_normal)
        assert t.ci95[0] < t.difference < t.ci95[1]
        assert 0 < t.p_two_sided <= 1
    # the paper's significance count: 8 scenarios with p < 0.05 (as printed, rounding included)
    assert sum(float(r["paper_p"]) <= 0.05 for r in rows) == 8


def test_pgg_welch():
    rng = np.random.default_rng(0)
    data = {"student_base": rng.integers(0, 4, 300), "student_finetuned": rng.integers(3, 8, 300), "teacher": rng.integers(5, 11, 300)}
    res = pgg_analysis({k: v.astype(float) for k, v in data.items()})
    assert res["roles"]["teacher"]["n"] == 300
    assert res["tests"]["student_finetuned_vs_student_base"]["p_value"] < 1e-10
    base, ft, teacher = (res["roles"][r]["mean"] for r in ("student_base", "student_finetuned", "teacher"))
    assert res["improvement"] == pytest.approx((ft - base) / (teacher - base) * 100)

"""Evaluator metrics: sampled and exact results -> the paper's numbers, stable MLflow metric names."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.fixtures import synthetic_results as synthetic
from tomtransfer.services.evaluator.scoring import (
    EvaluationDataError,
    evaluate_exact,
    evaluate_samples,
    metric_name,
    read_samples,
)
from tomtransfer.shared.metrics import binary_js
from tomtransfer.shared.stats import table1_ztest

TABLE1 = Path(__file__).parent / "data" / "table1_paper.csv"
NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")
N_BOOT = 300  # bootstrap resamples: enough for the CI checks here, cheap on 2 cores


@pytest.fixture(scope="module")
def groups():
    return synthetic.paper_groups()


@pytest.fixture(scope="module")
def sampled(groups):
    return evaluate_samples(synthetic.expand(groups), expected_samples=300, n_resamples=N_BOOT)


@pytest.fixture(scope="module")
def exact(groups):
    return evaluate_exact(synthetic.exact_from_groups(groups), samples=300, n_resamples=N_BOOT)


def test_golden_paper_improvement_from_raw_samples(sampled):
    f = sampled.families["in_sample"]
    a = f.improvement
    assert a.n == 20
    assert round(a.mean, 2) == 46.26 and round(a.median, 2) == 32.33 and round(a.sd, 2) == 48.60
    assert round(a.min, 2) == -25.00 and round(a.max, 2) == 200.00
    assert f.classes == {"exacerbation": 2, "partial": 16, "overcorrection": 2, "undefined": 0}
    assert a.ci95[0] < a.mean < a.ci95[1]
    by_id = {s.id: s for s in sampled.scenarios}
    assert by_id["team_prison"].cls == by_id["friendsharing_prison"].cls == "exacerbation"
    assert by_id["team_delight"].unstable and not by_id["IR_prison"].unstable
    assert by_id["IR_prison"].improvement == pytest.approx((221 - 254) / (77 - 254) * 100)
    assert set(f.unstable) <= {s.id for s in sampled.scenarios_of("in_sample") if s.unstable}
    # the by-game means are means over that game's scenarios
    prison = [s.improvement for s in sampled.scenarios_of("in_sample") if s.game == "prison"]
    assert f.by_game["prison"].mean == pytest.approx(np.mean(prison))


def test_every_sample_is_accounted(sampled, groups):
    for r in sampled.rates:
        assert r.valid + r.invalid == r.n == 300
    inv = {(g["role"], g["scenario_id"]): g.get("invalid", 0) for g in groups}
    for r in sampled.rates:
        assert r.invalid == inv[(r.role, r.scenario_id)]
    # both rates: the paper's count (C out of N, the default basis) and the conditional one (C out of valid)
    r = next(r for r in sampled.rates if r.role == "student_base" and r.scenario_id == "sports_prison")
    assert r.invalid == 3 and r.rate_conditional == pytest.approx(r.cooperate / 297)
    assert r.rate == r.rate_count == pytest.approx(r.cooperate / 300) and r.valid_share == pytest.approx(0.99)


def test_counts_are_checked(groups):
    df = synthetic.expand([g for g in groups if g["scenario_id"] in ("IR_prison", "pgg")])
    with pytest.raises(EvaluationDataError, match="expected exactly 300"):
        evaluate_samples(df.iloc[1:], expected_samples=300, n_resamples=N_BOOT)
    with pytest.raises(EvaluationDataError, match="duplicate"):
        evaluate_samples(pd.concat([df, df.iloc[:1]]), n_resamples=N_BOOT)
    bad = df.copy()
    bad.loc[bad.index[bad["valid"]][0], "answer"] = None
    with pytest.raises(EvaluationDataError, match="valid without an answer"):
        evaluate_samples(bad, n_resamples=N_BOOT)
    with pytest.raises(EvaluationDataError, match="lack column"):
        evaluate_samples(df.drop(columns=["valid"]), n_resamples=N_BOOT)
    with pytest.raises(EvaluationDataError, match="unknown role"):
        evaluate_samples(df.assign(role="judge"), n_resamples=N_BOOT)


def test_table1_pairs_in_sample_with_doubled_games(sampled):
    rows = {r.id: r for r in sampled.table1}
    assert len(rows) == 20 and "team_prison" in rows
    with open(TABLE1) as fh:
        for line in csv.DictReader(fh):
            sid = f"{line['context']}_{line['game']}"
            want = table1_ztest(sid, int(line["C_normal"]), 300, int(line["C_doubled"]), 300)
            assert rows[sid].z == pytest.approx(want.z) and rows[sid].p_value == pytest.approx(want.p_value)
            assert abs(rows[sid].z - float(line["paper_z"])) < 0.015  # the paper's printed z, 2 decimals
    assert sampled.table1_summary["average"]["p_normal"] == pytest.approx(np.mean([r.p_normal for r in rows.values()]))


def test_pgg_means_and_welch(sampled, groups):
    p = sampled.pgg["pgg"]
    contrib = {g["role"]: g["contributions"] for g in groups if g["scenario_id"] == "pgg"}
    for role, values in contrib.items():
        assert p.roles[role]["mean"] == pytest.approx(np.mean(values))
        assert p.roles[role]["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert p.roles["student_base"]["invalid"] == 2 and p.roles["student_base"]["n"] == 298
    m = {r: np.mean(v) for r, v in contrib.items()}
    assert p.improvement == pytest.approx((m["student_finetuned"] - m["student_base"]) / (m["teacher"] - m["student_base"]) * 100)
    assert p.tests["student_finetuned_vs_student_base"]["p_value"] < 1e-10
    assert 0 < p.js_ft_teacher < p.js_base_teacher <= 1


def test_flat_metric_names_and_values(sampled):
    m = sampled.flat_metrics()
    assert all(NAME_OK.match(k) for k in m), [k for k in m if not NAME_OK.match(k)][:5]
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    s = {x.id: x for x in sampled.scenarios}["IR_prison"]
    assert m["improvement.in_sample.IR_prison"] == pytest.approx(s.improvement)
    assert m["rate.teacher.in_sample.IR_prison"] == pytest.approx(77 / 300)
    assert m["rate.student_base.in_sample.IR_prison"] == pytest.approx(254 / 300)
    assert m["js.ft_teacher.in_sample.IR_prison"] == pytest.approx(binary_js(221 / 300, 77 / 300))
    assert m["improvement_mean.in_sample"] == pytest.approx(46.2597, abs=1e-3)
    assert m["improvement_mean.oos_context"] == pytest.approx(sampled.families["oos_context"].improvement.mean)
    assert m["improvement_n.all"] == 52
    assert m["classes.in_sample.partial"] == 16
    assert m["unstable.in_sample.team_delight"] == 1 and m["unstable.in_sample.IR_prison"] == 0
    assert m["improvement_ci_low.in_sample.IR_prison"] < m["improvement.in_sample.IR_prison"]
    assert m["improvement_mean.in_sample.game.prison"] == pytest.approx(sampled.families["in_sample"].by_game["prison"].mean)
    assert m["rate_mean.teacher.in_sample.context.IR"] == pytest.approx(np.mean([77, 106, 120, 109]) / 300)
    assert m["table1.z.team_prison"] == pytest.approx(1.6, abs=0.02)
    assert m["table1.n"] == 20
    assert m["pgg.mean.teacher"] == pytest.approx(sampled.pgg["pgg"].roles["teacher"]["mean"])
    assert "pgg.welch_p.student_finetuned_vs_student_base" in m
    assert m["samples.teacher"] == 53 * 300 and m["invalid.student_base"] == 12 * 3 + 2
    assert len(m) > 900


def test_metric_name_sanitising():
    assert metric_name("improvement.in_sample.my scenario/1!") == "improvement.in_sample.my_scenario_1_"
    assert metric_name("rate..x.") == "rate.x"


def test_exact_mode_matches_frequencies_and_documents_conventions(exact, sampled):
    assert exact.estimator == "exact" and exact.samples == 300
    assert exact.families["in_sample"].improvement.mean == pytest.approx(46.2597, abs=1e-3)
    assert all(s.ci95 is None for s in exact.scenarios)  # no sampling CI in exact mode
    e = {s.id: s for s in exact.scenarios}
    for s in sampled.scenarios:
        assert e[s.id].p_ft == pytest.approx(s.p_ft)
        assert e[s.id].unstable == s.unstable  # effective n = 300 = the sampled n
    t = {r.id: r for r in exact.table1}["biz_staghunt"]
    assert t.se == pytest.approx(math.sqrt(t.p_normal * (1 - t.p_normal) / 300))
    # PGG: mean/sd of the distribution, se with the effective n
    p, ps = exact.pgg["pgg"], sampled.pgg["pgg"]
    assert p.roles["teacher"]["mean"] == pytest.approx(ps.roles["teacher"]["mean"])
    assert p.roles["teacher"]["se"] == pytest.approx(p.roles["teacher"]["sd"] / math.sqrt(300))
    assert p.tests["student_finetuned_vs_student_base"]["p_value"] < 1e-10
    assert any("effective n = 300" in n for n in exact.notes)
    m = exact.flat_metrics()
    assert "improvement_ci_low.in_sample.IR_prison" not in m and "improvement.in_sample.IR_prison" in m
    assert m["invalid_rate.student_base.oos_context.sports_prison"] == pytest.approx(0.01)


def test_exact_rows_from_the_serving_store_schema(groups):
    """The serving store writes the PGG distribution as a JSON object {"0": p, ...} in `distribution`."""
    df = synthetic.exact_from_groups([g for g in groups if g["family"] in ("in_sample", "pgg")])
    dist = df["pgg_dist"].map(lambda s: None if not isinstance(s, str) else json.dumps({str(k): v for k, v in enumerate(json.loads(s))}))
    df = df.drop(columns=["pgg_dist"]).assign(distribution=dist)
    # unconditional p_C / p_D (their sum = valid_mass): the rate conditions on a valid answer
    df.loc[df["family"] != "pgg", ["p_C", "p_D"]] *= 0.5
    df.loc[df["family"] != "pgg", "valid_mass"] = 0.5
    r = evaluate_exact(df, samples=300, n_resamples=N_BOOT)
    assert r.families["in_sample"].improvement.mean == pytest.approx(46.2597, abs=1e-3)
    assert r.pgg["pgg"].endowment == 10 and r.pgg["pgg"].roles["teacher"]["mean"] > 6
    assert {x.invalid_rate for x in r.rates if x.family == "in_sample"} == {0.5}


def test_role_subsets_give_rates_only(groups):
    df = synthetic.expand([g for g in groups if g["role"] != "student_finetuned" and g["family"] != "oos_game"])
    r = evaluate_samples(df, n_resamples=N_BOOT)
    assert r.scenarios == () and r.table1 == () and r.families == {}
    assert r.roles == ("teacher", "student_base")
    assert r.pgg["pgg"].improvement is None and r.pgg["pgg"].tests == {}
    assert any("not evaluated: student_finetuned" in n for n in r.notes)
    m = r.flat_metrics()
    assert "rate.teacher.in_sample.IR_prison" in m and not any(k.startswith("improvement") for k in m)


def test_read_samples_from_a_folder(tmp_path, groups):
    df = synthetic.expand([g for g in groups if g["scenario_id"] == "IR_prison"])
    (tmp_path / "a").mkdir()
    df.iloc[:400].to_parquet(tmp_path / "a" / "part-0.parquet")
    df.iloc[400:].to_parquet(tmp_path / "part-1.parquet")
    synthetic.exact_from_groups([]).to_parquet(tmp_path / "exact.parquet")  # skipped by the samples reader
    assert len(read_samples(tmp_path)) == 900
    r = evaluate_samples(tmp_path, expected_samples=300, n_resamples=N_BOOT)
    assert r.scenarios[0].improvement == pytest.approx((221 - 254) / (77 - 254) * 100)

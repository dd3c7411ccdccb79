"""The paper's measurement protocol: an instruction and estimator per role, the teacher's reference from its
generated dataset, both rates with the valid share beside them, low-validity scenarios flagged."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tomtransfer.shared.config import ConfigError, parse_config
from tomtransfer.shared.scenarios import default_catalog

from tests.fixtures import synthetic_results as synthetic
from tomtransfer.services.evaluator.scoring import EvaluationDataError, evaluate
from tomtransfer.services.evaluator.report import build_document, summary_rows

BASE = {"name": "p", "models": {"teacher": {"model": "t"}, "student": {"model": "s"}}}
N_BOOT = 200


def cfg(**evaluate_kw):
    return parse_config({**BASE, "evaluate": evaluate_kw})


# ------------------------------------------------------------------------------------------ config
def test_paper_protocol_is_the_default():
    e = cfg().evaluate
    assert e.protocol == "paper" and e.rate == "count"
    assert [e.instruction_for(r) for r in ("teacher", "student_base", "student_finetuned")] == \
        ["answer_motivation", "answer_only", "answer_only"]
    assert cfg().teacher_from_dataset  # generate.instruction defaults to answer_motivation too


def test_exact_mode_only_where_the_answer_comes_first():
    e = cfg(estimator="exact").evaluate
    assert e.estimator_for("teacher") == "sample"  # a motivated answer may start with prose
    assert e.estimator_for("student_base") == e.estimator_for("student_finetuned") == "exact"
    legacy = cfg(estimator="exact", protocol="answer_only")
    assert {legacy.evaluate.estimator_for(r) for r in ("teacher", "student_base")} == {"exact"}
    assert not legacy.teacher_from_dataset  # its instruction is not the dataset's


def test_protocol_line_names_every_role():
    line = cfg(estimator="exact").protocol_line()
    assert "protocol paper" in line and "teacher answer_motivation (its generated dataset" in line
    assert "student_base answer_only (exact)" in line and "rate = count (C out of N)" in line


def test_per_role_override_and_a_dataset_reference_that_cannot_hold():
    e = cfg(instructions={"student_finetuned": "answer_motivation"}).evaluate
    assert e.instruction_for("student_finetuned") == "answer_motivation"
    with pytest.raises(ConfigError, match="teacher_reference 'dataset' needs"):
        cfg(protocol="answer_only", teacher_reference="dataset")
    with pytest.raises(ConfigError, match="min_valid_share"):
        cfg(min_valid_share=1.5)


def test_the_placebo_role_follows_training_placebo():
    off, on = cfg(), parse_config({**BASE, "training": {"placebo": True}, "evaluate": {"estimator": "exact"}})
    assert off.evaluate.roles == ["teacher", "student_base", "student_finetuned"]
    assert on.evaluate.roles == ["teacher", "student_base", "student_finetuned", "student_placebo"]
    # measured exactly like the fine-tuned student, also under a per-role override
    assert on.evaluate.estimator_for("student_placebo") == "exact" and "student_placebo answer_only (exact)" in \
        on.protocol_line()
    assert cfg(instructions={"student_finetuned": "answer_motivation"}).evaluate.instruction_for(
        "student_placebo") == "answer_motivation"
    # a dump read back (a sweep cell, config.yaml in MLflow) is the same config
    assert parse_config(on.model_dump(mode="json")).evaluate.roles == on.evaluate.roles
    with pytest.raises(ConfigError, match="student_placebo needs training.placebo"):
        cfg(roles=["teacher", "student_base", "student_finetuned", "student_placebo"])


def test_teacher_lead_defaults_on_with_the_exact_estimator_and_only_for_a_sampled_teacher():
    assert cfg(estimator="exact").evaluate.teacher_lead_on and not cfg().evaluate.teacher_lead_on
    assert not cfg(estimator="exact", teacher_lead=False).evaluate.teacher_lead_on
    assert cfg(teacher_lead=True).evaluate.teacher_lead_on  # asked for: also with sampled students
    assert not cfg(estimator="exact", protocol="answer_only").evaluate.teacher_lead_on  # an exact teacher
    assert not cfg(estimator="exact", roles=["student_base"]).evaluate.teacher_lead_on
    assert "exact leading-answer mass on the 2x2 games" in cfg(estimator="exact").protocol_line()


# ------------------------------------------------------------------------------------------ metrics
def _dataset_teacher(c_by_sid: dict[str, int], n: int = 4) -> pd.DataFrame:
    cat = default_catalog().scenarios
    groups = [{"role": "teacher", "scenario_id": sid, "family": cat[sid].family, "context": cat[sid].context.id,
               "game": cat[sid].game_id, "n": n, "c": c} for sid, c in c_by_sid.items()]
    df = synthetic.expand(groups)
    df["source"] = "dataset"
    return df


def _exact_students(rows: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]]) -> pd.DataFrame:
    """sid -> ((p_C, p_D, valid_mass) base, (...) fine-tuned)."""
    cat = default_catalog().scenarios
    out = []
    for sid, (base, ft) in rows.items():
        s = cat[sid]
        for role, (pc, pd_, vm) in (("student_base", base), ("student_finetuned", ft)):
            out.append({"role": role, "scenario_id": sid, "family": s.family, "context": s.context.id,
                        "game": s.game_id, "p_C": pc, "p_D": pd_, "valid_mass": vm, "pgg_dist": None})
    return pd.DataFrame(out)


def test_teacher_dataset_and_exact_students_mix():
    teacher = _dataset_teacher({"IR_prison": 3, "IR_staghunt": 4, "IR_snowdrift": 2})
    students = _exact_students({
        "IR_prison": ((0.004, 0.002, 0.006), (0.05, 0.01, 0.06)),
        "IR_staghunt": ((0.001, 0.001, 0.002), (0.03, 0.0, 0.03)),
        "IR_snowdrift": ((0.002, 0.0, 0.002), (0.02, 0.02, 0.04)),
    })
    r = evaluate(teacher, students, expected_samples=300, effective_n=300, n_resamples=N_BOOT)
    assert r.estimator == "mixed" and r.rate_basis == "count"
    by = {s.id: s for s in r.scenarios}
    # count rate: C out of N for the teacher's 4 dataset samples, p_C for the exact students
    assert by["IR_prison"].p_teacher == 0.75 and by["IR_prison"].p_base == 0.004
    assert by["IR_prison"].improvement == pytest.approx((0.05 - 0.004) / (0.75 - 0.004) * 100)
    assert by["IR_prison"].ci95 is None  # exact roles carry no sampling noise to bootstrap
    rates = {(x.role, x.scenario_id): x for x in r.rates}
    t = rates[("teacher", "IR_prison")]
    assert t.source == "dataset" and t.n == 4 and t.rate_conditional == 0.75 and t.valid_share == 1.0
    ft = rates[("student_finetuned", "IR_snowdrift")]
    assert ft.rate_conditional == pytest.approx(0.5) and ft.valid_share == pytest.approx(0.04)
    f = r.families["in_sample"]
    assert f.improvement.n == 3 and f.js_ft_teacher.mean < f.js_base_teacher.mean


def test_the_conditional_rate_drops_low_validity_scenarios_from_aggregates():
    teacher = _dataset_teacher({"IR_prison": 3, "IR_staghunt": 4, "IR_snowdrift": 3, "IR_delight": 4})
    students = _exact_students({
        "IR_prison": ((0.004, 0.002, 0.006), (0.05, 0.01, 0.06)),
        "IR_staghunt": ((0.1, 0.3, 0.4), (0.3, 0.2, 0.5)),
        "IR_snowdrift": ((0.2, 0.2, 0.4), (0.3, 0.2, 0.5)),
        "IR_delight": ((0.3, 0.3, 0.6), (0.5, 0.1, 0.6)),
    })
    cond = evaluate(teacher, students, effective_n=300, rate="conditional", min_valid_share=0.1, n_resamples=N_BOOT)
    f = cond.families["in_sample"]
    assert f.low_valid == ("IR_prison",) and f.excluded == ("IR_prison",)
    assert f.improvement.n == 3 and f.scenarios == 3
    assert any("left out of the aggregates: IR_prison" in n for n in cond.notes)
    m = cond.flat_metrics()
    assert m["excluded_count.in_sample"] == 1 and m["low_valid_count.in_sample"] == 1
    assert m["valid_share.student_base.in_sample.IR_prison"] == pytest.approx(0.006)
    assert m["rate_count.student_finetuned.in_sample.IR_prison"] == pytest.approx(0.05)
    assert m["rate_conditional.student_finetuned.in_sample.IR_prison"] == pytest.approx(0.05 / 0.06)
    count = evaluate(teacher, students, effective_n=300, rate="count", min_valid_share=0.1, n_resamples=N_BOOT)
    fc = count.families["in_sample"]
    assert fc.low_valid == ("IR_prison",) and fc.excluded == () and fc.improvement.n == 4  # N is the denominator


def test_one_source_per_role_and_scenario():
    teacher = _dataset_teacher({"IR_prison": 3})
    clash = _exact_students({"IR_prison": ((0.1, 0.1, 0.2), (0.1, 0.1, 0.2))})
    clash.loc[0, "role"] = "teacher"
    with pytest.raises(EvaluationDataError, match="teacher IR_prison: results from two sources"):
        evaluate(teacher, clash, n_resamples=N_BOOT)


def test_report_and_console_name_the_protocol_and_valid_shares():
    teacher = _dataset_teacher({"IR_prison": 3, "IR_staghunt": 4, "IR_snowdrift": 2})
    students = _exact_students({sid: ((0.004, 0.002, 0.006), (0.05, 0.01, 0.06))
                                for sid in ("IR_prison", "IR_staghunt", "IR_snowdrift")})
    line = cfg(estimator="exact").protocol_line()
    r = evaluate(teacher, students, protocol=line, min_valid_share=0.1, n_resamples=N_BOOT)
    md = build_document(r).markdown(__import__("pathlib").Path("."))
    assert line in md and "count-based, C out of all N" in md
    assert "valid share teacher 100.0 %, base 0.6 %, ft 6.0 %" in md and "valid % t/b/ft" in md
    header, rows = summary_rows(r)
    assert rows[0][header.index("valid % t/b/ft")] == "100.0/0.6/6.0"
    assert json.loads(json.dumps(r.to_dict(), default=str))["protocol"] == line


def test_pgg_with_one_valid_teacher_answer_and_exact_students():
    """The demo's case: 4 motivated teacher samples with one valid amount, students as exact distributions."""
    cat = default_catalog().scenarios
    s = cat["pgg"]
    teacher = synthetic.expand([{"role": "teacher", "scenario_id": "pgg", "family": "pgg", "context": s.context.id,
                                 "game": s.game_id, "n": 4, "contributions": [7], "invalid": 3}])
    dist = json.dumps([0.1] * 10 + [0.0])
    students = pd.DataFrame([{"role": r, "scenario_id": "pgg", "family": "pgg", "context": s.context.id,
                              "game": s.game_id, "p_C": None, "p_D": None, "valid_mass": 0.5, "pgg_dist": dist}
                             for r in ("student_base", "student_finetuned")])
    r = evaluate(teacher, students, effective_n=300, n_resamples=N_BOOT)
    p = r.pgg["pgg"]
    assert p.roles["teacher"]["mean"] == 7 and p.roles["teacher"]["n"] == 1
    assert p.roles["student_base"]["mean"] == pytest.approx(4.5)
    t = p.tests["student_finetuned_vs_teacher"]
    assert t["t"] is None and "fewer than 2" in t["note"]
    same = p.tests["student_finetuned_vs_student_base"]  # identical distributions with spread: t = 0, defined
    assert same["difference"] == pytest.approx(0) and same["t"] == pytest.approx(0)

"""Strategic transfer (`shared.transfer`) on students whose answer is known (`tests.fixtures.synthetic_students`).

The count-rate improvement ranks a format-only student (+95 %) and one that moves against the teacher (+131 %)
above one that copies it (+58 %) when students differ in how often they answer validly; `transfer` must not:
format-only ~ 0 with a CI that contains 0, copy >= 70 with a CI above 0, anti below 0 with a CI below 0, partial
near 50, a constant student near the truth of its definition, and the placebo difference with its CI. One path
goes through the CLI (`analyze --samples F --json`, the keys an outside check reads), the rest through the
evaluator directly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tomtransfer.services.evaluator.scoring import evaluate
from tomtransfer.shared.sample_files import load_samples
from tomtransfer.shared.transfer import Choice, Estimate, analyze_group, mean_transfer, split_improvement, verdict
from tests.fixtures.synthetic_students import TRUTH, responses

ROOT = Path(__file__).resolve().parents[1]


def _result(kind: str, seed: int = 0, placebo: str | None = None, tmp: Path | None = None):
    path = (tmp or Path("/tmp")) / f"synthetic-{kind}-{seed}-{placebo}.csv"
    responses(kind, seed=seed, placebo=placebo).to_csv(path, index=False)
    return evaluate(load_samples(path), n_resamples=1000, seed=seed)


@pytest.mark.parametrize("kind", ["format_only", "copy", "anti"])
def test_analyze_cli_reports_transfer_right_for_known_students(kind, tmp_path):
    path = tmp_path / f"{kind}.csv"
    responses(kind).to_csv(path, index=False)
    proc = subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", "analyze", "--samples", str(path), "--json",
                           "--bootstrap", "1000"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fam = json.loads(proc.stdout)["families"]["in_sample"]
    t, imp = fam["transfer"], fam["improvement"]
    assert set(t) >= {"mean", "ci95", "n"} and t["n"] == 20
    lo, hi = t["ci95"]
    if kind == "format_only":
        assert lo <= 0 <= hi and abs(t["mean"]) < 25
        assert imp["mean"] > 50  # the paper's count rate calls this a large improvement: it is format
    elif kind == "copy":
        assert t["mean"] >= 70 and lo > 0
    else:
        assert t["mean"] < 0 and hi < 0
    assert fam["format"]["mean"] == pytest.approx(55, abs=4)  # valid share 5 % -> 60 %, in percentage points


@pytest.mark.parametrize("kind", ["partial", "constant_c"])
def test_transfer_recovers_partial_and_constant_students(kind, tmp_path):
    fam = _result(kind, tmp=tmp_path).families["in_sample"]
    t = fam.strategy.transfer["student_finetuned"]
    lo, hi = t.ci95
    assert lo - 5 <= TRUTH[kind] <= hi + 5, (kind, t)
    if kind == "constant_c":  # a student with one choice everywhere does not follow the teacher's differences
        r = fam.strategy.association["student_finetuned"]
        assert r.mean is None or abs(r.mean) < 0.6


def test_placebo_difference_separates_a_copying_student_from_its_placebo(tmp_path):
    fam = _result("copy", placebo="placebo", tmp=tmp_path).families["in_sample"]
    st = fam.strategy
    assert st.placebo_difference is not None
    assert st.placebo_difference.ci95[0] > 0
    d = fam.to_dict()
    assert d["placebo_difference"]["mean"] == pytest.approx(
        d["transfer"]["mean"] - d["transfer_placebo"]["mean"])


def test_association_follows_the_teachers_differences(tmp_path):
    st = _result("copy", tmp=tmp_path).families["in_sample"].strategy
    assert st.association["student_finetuned"].mean > 0.8
    assert st.association["student_finetuned"].ci95[0] > st.association["student_base"].mean
    assert st.association_gain.ci95[0] > 0
    anti = _result("anti", tmp=tmp_path).families["in_sample"].strategy
    assert anti.association["student_finetuned"].mean < -0.8


def test_format_only_calibration_over_seeds():
    """Over 20 independent format-only students the CI contains 0 nearly always and the mean is unbiased."""
    rng = np.random.default_rng(1)
    qt = np.linspace(0.15, 0.85, 20)

    def counts(q, share):
        return Choice.counts(*rng.multinomial(300, [share * q, share * (1 - q), 1 - share]))

    means, covered = [], 0
    for seed in range(20):
        rows = [{"teacher": counts(t, 0.7), "student_base": counts(0.5, 0.05), "student_finetuned": counts(0.5, 0.6)}
                for t in qt]
        t = analyze_group(rows, n_resamples=500, seed=seed).transfer["student_finetuned"]
        means.append(t.mean)
        covered += t.ci95[0] <= 0 <= t.ci95[1]
    assert covered >= 18
    assert abs(np.mean(means)) < 8


def test_no_valid_answers_weighs_zero_and_no_gap_is_undefined_not_huge():
    ex = Choice.exact
    rows = [{"teacher": ex(0.2 + 0.03 * i, 0.8 - 0.03 * i), "student_base": Choice.counts(0, 0, 300),
             "student_finetuned": ex(0.2 + 0.03 * i, 0.8 - 0.03 * i)} for i in range(10)]
    g = analyze_group(rows, n_resamples=200)
    assert g.transfer["student_finetuned"].mean is None  # base never answered: nothing to compare with
    same = [{"teacher": ex(0.5, 0.5), "student_base": ex(0.5, 0.5), "student_finetuned": ex(0.9, 0.1)}] * 5
    t = analyze_group(same, n_resamples=200).transfer["student_finetuned"]
    assert t.mean is None and "nothing to transfer" in t.note


def test_exact_students_and_a_mixture_teacher():
    """Noise-free students: the CI comes from the scenarios and the teacher's sampled remainder only."""
    qt = np.linspace(0.2, 0.8, 12)
    rows = [{"teacher": Choice.mixture(0.5 * t, 0.5 * (1 - t), int(8 * t), 8 - int(8 * t), 2),
             "student_base": Choice.exact(0.002, 0.002),
             "student_finetuned": Choice.exact(0.05 * (0.5 + 0.8 * (t - 0.5)), 0.05 * (0.5 - 0.8 * (t - 0.5)))}
            for t in qt]
    t = analyze_group(rows, n_resamples=1000).transfer["student_finetuned"]
    assert t.ci95[0] <= 80 <= t.ci95[1] and t.ci95[0] > 0  # truth ~80 (the teacher's q is t up to rounding)


def test_mixture_combines_the_leading_mass_with_the_sampled_remainder():
    m = Choice.mixture(0.3, 0.2, 2, 1, 1)  # half the mass leads; of the rest C 2/4, D 1/4, invalid 1/4
    pc, pd = m.probs()
    assert pc == pytest.approx(0.3 + 0.5 * 0.5) and pd == pytest.approx(0.2 + 0.5 * 0.25)
    assert m.share == pytest.approx(pc + pd) and m.q == pytest.approx(pc / (pc + pd))
    assert 0 < m.variance() < Choice.counts(2, 1, 1).variance()
    assert Choice.exact(0.3, 0.2).variance() == 0 and math.isinf(Choice.counts(0, 0, 5).variance())


def test_split_improvement_sums_to_the_count_rate_improvement():
    b, f, t = Choice.counts(3, 2, 95), Choice.counts(30, 30, 40), Choice.counts(60, 20, 20)
    fmt, choice = split_improvement(b, f, t)
    pb, pf, pt = 3 / 100, 30 / 100, 60 / 100
    assert fmt + choice == pytest.approx((pf - pb) / (pt - pb) * 100)
    assert fmt > 0 > choice  # the valid share rose; the choice moved away from the teacher's (0.6 -> 0.5 < 0.75)


def test_verdict_needs_the_placebo_to_call_a_move_strategy():
    """A move toward the teacher is called the teacher's strategy only when it beats the placebo (which learns the
    teacher's answers on the wrong scenarios, so its average choice too): the demo's sft+distribution run moved
    +17.7 % [10.7, 27.2] in-sample with a placebo difference of +0.0 % [-1.3, 0.9]."""
    moved = Estimate(17.7, (10.7, 27.2), 20)
    assert verdict(moved) == "strategic transfer shown"  # no placebo trained: nothing to compare with
    assert verdict(moved, 3.9, Estimate(0.0, (-1.3, 0.9), 20)).startswith("moved toward the teacher, no more than")
    assert verdict(moved, 3.9, Estimate(12.0, (4.0, 20.0), 20)) == "strategic transfer shown, above the placebo"
    assert "less than the placebo" in verdict(moved, 3.9, Estimate(-9.0, (-12.0, -2.0), 20))
    assert verdict(Estimate(2.0, (-3.0, 8.0), 20), 5.0) == "no strategic transfer shown: the gain is format"
    # the demo's SFT student in-sample: +3.6 [-3.8, 9.2], its placebo moved away (difference +5.8 [4.8, 8.7])
    assert verdict(Estimate(3.6, (-3.8, 9.2), 20), 4.7, Estimate(5.8, (4.8, 8.7), 20)).endswith("above the placebo")
    assert verdict(Estimate(-40.0, (-60.0, -20.0), 20), 5.0) == "moved away from the teacher"
    assert verdict(Estimate(None, None, 0, "no gap left")) == "undefined (no gap left)"


def test_pgg_transfer_has_no_ci_from_a_single_valid_teacher_answer():
    """The demo's teacher gave one valid public-goods contribution of four: a bootstrap of one value has no spread,
    and a CI of zero width ([1.38, 1.38]) would claim a certainty nothing supports."""
    rng = np.random.default_rng(0)
    base, ft, pl = (rng.normal(m, 4, 300).clip(0, 10) for m in (4.0, 4.1, 4.1))
    one, _ = mean_transfer({"teacher": [10.0], "student_base": base, "student_finetuned": ft, "student_placebo": pl})
    t = one["student_finetuned"]
    assert t.mean is not None and t.ci95 is None and "teacher" in t.note
    many, placebo = mean_transfer({"teacher": [10.0, 9.0, 8.0, 10.0], "student_base": base, "student_finetuned": ft,
                                   "student_placebo": pl})
    assert many["student_finetuned"].ci95 is not None and placebo.ci95 is not None
    lo, hi = many["student_finetuned"].ci95
    assert hi - lo > 1.0

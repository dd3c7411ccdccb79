"""`tomtransfer analyze --samples FILE`: raw responses (CSV, JSONL, Parquet) -> parsed -> the evaluator's metrics.

Counts and improvement are checked against a hand computation; every format gives the same numbers; bad input
is one line on stderr, exit 2, and nothing written.
"""

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.cli import tomtransfer

ROOT = Path(__file__).resolve().parents[1]

# (role, scenario) -> responses. Unequal N per group; invalid answers ("not sure", empty) included.
C = ["C", "I choose C", "**C** - cooperation pays", "My choice is strategy C.\nBecause trust matters."]
D = ["D", "**D**", "I would choose strategy D, \"safer\"", "D: my coplayer may defect, so D."]
BAD = ["I am not sure.", "", "C or D?"]


def _answers(c: int, d: int, bad: int) -> list[str]:
    return [C[i % 4] for i in range(c)] + [D[i % 4] for i in range(d)] + [BAD[i % 3] for i in range(bad)]


GROUPS_2X2 = {
    # scenario: {role: (C, D, invalid)}
    "IR_prison": {"teacher": (3, 6, 1), "student_base": (9, 2, 1), "student_finetuned": (4, 4, 0)},
    "biz_staghunt": {"teacher": (8, 2, 0), "student_base": (2, 6, 2), "student_finetuned": (5, 4, 0)},
    "IR_prison_x2": {"teacher": (2, 7, 0), "student_base": (8, 2, 0), "student_finetuned": (6, 4, 1)},
}
PGG = {
    "teacher": ["7", "I contribute $7", "7"] * 4,  # the paper's teacher: 7 every time
    "student_base": ["2", "I would put 3 into the fund", "0", "5", "I keep it all"],  # keep all = contribute 0
    "student_finetuned": ["6", "5", "I contribute $7 of my $10", "4", "6", "11"],  # 11 > endowment: invalid
}


def records(scenarios=("IR_prison", "biz_staghunt", "IR_prison_x2", "pgg")) -> list[dict]:
    rows = []
    for sid in scenarios:
        if sid == "pgg":
            rows += [{"role": r, "scenario": "pgg", "response": t} for r, ts in PGG.items() for t in ts]
        else:
            for role, (c, d, bad) in GROUPS_2X2[sid].items():
                rows += [{"role": role, "scenario": sid, "response": t} for t in _answers(c, d, bad)]
    return rows


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df.to_parquet(path, index=False)
    return path


def cli(*args, warn_errors=False):
    """`python [-W error::RuntimeWarning] -m services.cli ARGS`, a process of its own (without flags: forked from a
    helper with the imports done, tests/fixtures/cli.py)."""
    flags = ["-W", "error::RuntimeWarning"] if warn_errors else []
    return tomtransfer(*args, flags=flags, cwd=ROOT, timeout=180)


def analyze_json(path: Path, *extra) -> dict:
    r = cli("analyze", "--samples", path, "--json", "--bootstrap", 200, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def rate(c: int, d: int, bad: int, basis: str) -> float:
    """The cooperation rate by hand: C / N (`count`, invalid = not C) or C / valid answers (`conditional`)."""
    return c / (c + d + bad) if basis == "count" else c / (c + d)


def improvement(sid: str, basis: str) -> float:
    p = {role: rate(*cdb, basis) for role, cdb in GROUPS_2X2[sid].items()}
    return (p["student_finetuned"] - p["student_base"]) / (p["teacher"] - p["student_base"]) * 100


def basis_of(res: dict) -> str:
    return res.get("rate_basis", "conditional")  # an evaluator without the option: C / valid (the paper's)


@pytest.fixture(scope="module")
def by_format(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    df = pd.DataFrame(records())
    out = {ext: analyze_json(write(df, d / f"samples.{ext}")) for ext in ("csv", "jsonl", "parquet")}
    out["conditional"] = analyze_json(d / "samples.csv", "--rate", "conditional")
    return out


def test_same_numbers_from_every_format(by_format):
    assert by_format["csv"] == by_format["jsonl"] == by_format["parquet"]


@pytest.mark.parametrize("which", ["csv", "conditional"])
def test_counts_and_improvement_by_hand(by_format, which):
    res = by_format[which]
    basis = basis_of(res)
    rates = {(r["role"], r["scenario_id"]): r for r in res["rates"]}
    for sid, groups in GROUPS_2X2.items():
        for role, (c, d, bad) in groups.items():
            r = rates[(role, sid)]
            assert (r["n"], r["valid"], r["invalid"], r["cooperate"]) == (c + d + bad, c + d, bad, c), (role, sid)
            assert r["rate"] == pytest.approx(rate(c, d, bad, basis))
    assert res["samples"] is None  # unequal N per group is fine
    scen = {s["id"]: s for s in res["scenarios"]}
    assert set(scen) == set(GROUPS_2X2)
    # IR_prison, C/valid/N: base 9/11/12, ft 4/8/8, teacher 3/9/10
    #   count:       (4/8 - 9/12) / (3/10 - 9/12) = 55.56 %;  conditional: (4/8 - 9/11) / (3/9 - 9/11) = 65.625 %
    assert scen["IR_prison"]["improvement"] == pytest.approx(500 / 9 if basis == "count" else 65.625)
    for sid in GROUPS_2X2:
        assert scen[sid]["improvement"] == pytest.approx(improvement(sid, basis))
        assert scen[sid]["class"] == "partial"
    assert scen["IR_prison_x2"]["family"] == "oos_game"
    ins = res["families"]["in_sample"]["improvement"]
    assert ins["n"] == 2
    assert ins["mean"] == pytest.approx((improvement("IR_prison", basis) + improvement("biz_staghunt", basis)) / 2)
    assert res["overall"]["improvement"]["n"] == 3


def test_table1_needs_both_payoff_scales(by_format, tmp_path):
    rows = by_format["csv"]["table1"]["rows"]
    assert [r["id"] for r in rows] == ["IR_prison"]
    r = rows[0]  # student_finetuned: 4 C of 8 valid of 8 normal, 6 C of 10 valid of 11 doubled
    p2 = rate(6, 4, 1, basis_of(by_format["csv"]))
    assert r["p_normal"] == 0.5 and r["p_doubled"] == pytest.approx(p2)
    assert r["z"] == pytest.approx((0.5 - p2) / math.sqrt(0.25 / 8))
    one_scale = analyze_json(write(pd.DataFrame(records(("IR_prison", "biz_staghunt"))), tmp_path / "s.csv"))
    assert one_scale["table1"]["rows"] == [] and one_scale["scenarios"]


def test_pgg_results(by_format):
    p = by_format["parquet"]["pgg"]["pgg"]
    roles = p["roles"]
    assert roles["teacher"]["mean"] == 7 and roles["teacher"]["sd"] == 0 and roles["teacher"]["n"] == 12
    assert roles["student_base"]["mean"] == pytest.approx(2.0) and roles["student_base"]["invalid"] == 0
    assert roles["student_finetuned"]["mean"] == pytest.approx(5.6) and roles["student_finetuned"]["invalid"] == 1
    assert p["improvement"] == pytest.approx((5.6 - 2.0) / (7 - 2.0) * 100)
    t = p["tests"]
    assert t["student_finetuned_vs_student_base"]["method"] == "welch"
    assert t["student_finetuned_vs_student_base"]["p_value"] is not None
    zero = t["teacher_vs_student_base"]
    assert zero["method"] == "one_sample" and zero["df"] == 4  # 5 valid base contributions
    assert "teacher: all contributions equal (7.0)" in zero["note"]


def test_human_summary_and_out(tmp_path):
    f = write(pd.DataFrame(records()), tmp_path / "s.jsonl")
    out = tmp_path / "out"
    r = cli("analyze", "--samples", f, "--bootstrap", 200, "--out", out, warn_errors=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no scipy warning, although the teacher gave 7 every time
    basis = "count" if "cooperation rate: count" in r.stdout else "conditional"
    for text in ("responses parsed from s.jsonl", "improvement per scenario", f"{improvement('IR_prison', basis):.2f}",
                 "Table 1",
                 "public-goods game pgg", "teacher: all contributions equal (7.0)", "wrote"):
        assert text in r.stdout, text
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "samples.parquet"]
    parsed = pd.read_parquet(out / "samples.parquet")
    assert len(parsed) == len(records())
    assert {"role", "scenario_id", "family", "context", "game", "sample_index", "answer", "valid",
            "response"} <= set(parsed.columns)
    assert parsed.loc[parsed.response == "I contribute $7", "answer"].unique().tolist() == ["7"]
    assert not parsed.loc[parsed.response == "C or D?", "valid"].any()
    assert json.loads((out / "result.json").read_text())["scenarios"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.jsonl"]  # no staging folder left


def test_scenario_not_in_catalog_with_context_and_game(tmp_path):
    rows = [dict(r, scenario="my_prison", context="IR", game="prison") for r in records(("IR_prison",))]
    res = analyze_json(write(pd.DataFrame(rows), tmp_path / "s.parquet"))
    s = res["scenarios"][0]
    assert s["id"] == "my_prison" and s["family"] == "custom"
    assert s["improvement"] == pytest.approx(improvement("IR_prison", basis_of(res)))


def test_rate_and_min_valid_share_pass_through_only_if_accepted(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tomtransfer.services import cli as cli_mod
    from tomtransfer.services.evaluator import scoring

    f = write(pd.DataFrame(records(("IR_prison",))), tmp_path / "s.csv")
    real = scoring.evaluate_samples
    seen = {}

    def new_style(df, *, expected_samples=None, n_resamples=2000, seed=0, rate="count", min_valid_share=0.1):
        seen.update(rate=rate, min_valid_share=min_valid_share, expected_samples=expected_samples)
        return real(df, expected_samples=expected_samples, n_resamples=n_resamples, seed=seed)

    def old_style(df, *, expected_samples=None, n_resamples=2000, seed=0):
        seen.update(old=True)
        return real(df, expected_samples=expected_samples, n_resamples=n_resamples, seed=seed)

    args = ["analyze", "--samples", str(f), "--json", "--bootstrap", "100", "--rate", "conditional",
            "--min-valid-share", "0.25"]
    monkeypatch.setattr(scoring, "evaluate_samples", new_style)
    r = CliRunner().invoke(cli_mod.app, args)
    assert r.exit_code == 0, r.output
    assert seen == {"rate": "conditional", "min_valid_share": 0.25, "expected_samples": None}
    monkeypatch.setattr(scoring, "evaluate_samples", old_style)
    seen.clear()
    r = CliRunner().invoke(cli_mod.app, args)
    assert r.exit_code == 0 and seen == {"old": True}


def test_no_warning_for_zero_variance_groups():
    from tomtransfer.services.evaluator.scoring import evaluate_samples
    from tomtransfer.shared.sample_files import parse_samples

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evaluate_samples(parse_samples(pd.DataFrame(records(("pgg",)))), n_resamples=100)
    t = res.pgg["pgg"].tests
    assert t["student_finetuned_vs_teacher"]["t"] is not None  # the one-sample form: defined, no warning


# --------------------------------------------------------------------------------------- bad input
def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


GOOD = pd.DataFrame(records(("IR_prison",)))


def _bad(tmp_path: Path, case: str) -> Path:
    if case == "missing file":
        return tmp_path / "nowhere.csv"
    if case == "not utf-8":
        p = tmp_path / "s.csv"
        p.write_bytes("role,scenario,response\nteacher,IR_prison,Je coopère\n".encode("latin-1"))
        return p
    if case == "not utf-8 jsonl":
        p = tmp_path / "s.jsonl"
        p.write_bytes('{"role": "teacher", "scenario": "IR_prison", "response": "coopère"}\n'.encode("latin-1"))
        return p
    if case == "unknown extension":
        return write(GOOD, tmp_path / "s.csv").rename(tmp_path / "s.txt")
    if case == "not parquet":
        p = tmp_path / "s.parquet"
        p.write_text("role,scenario,response\n")
        return p
    if case == "missing column":
        return write(GOOD.drop(columns=["response"]), tmp_path / "s.jsonl")
    if case == "unknown role":
        return write(GOOD.assign(role=["tutor"] + GOOD.role.tolist()[1:]), tmp_path / "s.parquet")
    if case == "unknown scenario":
        return write(GOOD.assign(scenario="IR_chess"), tmp_path / "s.csv")
    if case == "empty file":
        p = tmp_path / "s.csv"
        p.write_text("")
        return p
    if case == "header only":
        p = tmp_path / "s.csv"
        p.write_text("role,scenario,response\n")
        return p
    if case == "empty jsonl":
        p = tmp_path / "s.jsonl"
        p.write_text("")
        return p
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("missing file", "file not found"),
    ("not utf-8", "not UTF-8 text"),
    ("not utf-8 jsonl", "not UTF-8 text"),
    ("unknown extension", "unknown format '.txt'"),
    ("not parquet", "not a readable Parquet file"),
    ("missing column", "missing column(s): response"),
    ("unknown role", "row 1: unknown role 'tutor'"),
    ("unknown scenario", "unknown scenario 'IR_chess'"),
    ("empty file", "empty file"),
    ("header only", "no data rows"),
    ("empty jsonl", "empty file"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case, message):
    f = _bad(tmp_path, case)
    before = _snapshot(tmp_path)
    r = cli("analyze", "--samples", f, "--out", tmp_path / "out", "--json")
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    assert _snapshot(tmp_path) == before


def test_bad_options(tmp_path):
    f = write(GOOD, tmp_path / "s.csv")
    before = _snapshot(tmp_path)
    for args, message in ((["--rate", "mean"], "--rate must be one of"),
                          (["--min-valid-share", "1.5"], "--min-valid-share must be in [0, 1]"),
                          (["--out", f], "not a folder")):
        r = cli("analyze", "--samples", f, *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("analyze", "--counts", f, "--out", tmp_path / "out")
    assert r.returncode == 2 and "apply to --samples only" in r.stderr
    assert _snapshot(tmp_path) == before

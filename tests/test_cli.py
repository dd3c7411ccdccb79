"""The CLI contract: exact JSON shapes, and bad input -> one line on stderr, exit 2, nothing written."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import tomtransfer

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "reference" / "paper-results" / "in_sample_cooperation_counts.csv"
LFB = ROOT.parent / "shared" / "reference" / "lfb"


def cli(*args, cwd=None):
    """`python -m services.cli ARGS`, a process of its own (forked from a helper with the imports done:
    tests/fixtures/cli.py)."""
    return tomtransfer(*args, cwd=cwd or ROOT, timeout=120)


def test_scenarios_list_json():
    r = cli("scenarios", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 53 and all({"id", "family", "context", "game"} <= set(x) for x in rows)
    for fam, n in {"in_sample": 20, "oos_context": 12, "oos_game": 20, "pgg": 1}.items():
        r = cli("scenarios", "list", "--family", fam, "--json")
        assert len(json.loads(r.stdout)) == n


def test_analyze_counts_json_contract():
    r = cli("analyze", "--counts", PAPER, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"mean", "median", "sd", "se", "n"} <= set(d["overall"])
    assert round(d["overall"]["mean"], 2) == 46.26
    assert all({"id", "improvement", "class"} <= set(s) for s in d["scenarios"])
    assert set(d["by_game"]) == {"prison", "delight", "staghunt", "snowdrift"}
    assert all({"mean", "se", "n"} <= set(v) for v in d["by_game"].values())
    assert set(d["by_context"]) == {"IR", "biz", "friendsharing", "environment", "team"}


def test_analyze_counts_human_table():
    r = cli("analyze", "--counts", PAPER)
    assert r.returncode == 0 and "overall: mean 46.26" in r.stdout


def test_analyze_ztest_json_contract():
    r = cli("analyze", "--ztest", ROOT / "tests" / "data" / "table1_paper.csv", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    keys = {"id", "p_normal", "p_doubled", "difference", "se", "z", "p_value", "se_two_sample", "z_two_sample",
            "p_two_sided", "ci95"}
    assert len(rows) == 20 and all(keys <= set(x) for x in rows)
    biz = next(x for x in rows if x["id"] == "biz_staghunt")
    assert round(biz["z"], 2) == 3.06 and biz["p_value"] < 0.005


def test_analyze_pgg_json_contract(tmp_path):
    f = tmp_path / "pgg.csv"
    f.write_text("role,contribution\n" + "".join(f"{r},{v}\n" for r, vs in
                 {"student_base": [0, 2, 3, 1], "student_finetuned": [4, 5, 6, 5], "teacher": [8, 9, 10, 7]}.items() for v in vs))
    d = json.loads(cli("analyze", "--pgg", f, "--json").stdout)
    assert set(d["roles"]) == {"student_base", "student_finetuned", "teacher"}
    assert d["roles"]["teacher"] == pytest.approx({"mean": 8.5, "sd": 1.2909944, "se": 0.6454972, "n": 4})
    assert d["improvement"] == pytest.approx((5 - 1.5) / (8.5 - 1.5) * 100)
    assert "student_finetuned_vs_student_base" in d["tests"]


def test_analyze_pgg_zero_variance_gives_a_note_not_a_warning(tmp_path):
    """The paper's teacher gave 7 every time: no scipy precision-loss warning, a note instead."""
    f = tmp_path / "pgg.csv"
    f.write_text("role,contribution\n" + "".join(f"{r},{v}\n" for r, vs in
                 {"student_base": [2, 5, 3], "student_finetuned": [7] * 5, "teacher": [7] * 5}.items() for v in vs))
    run = [sys.executable, "-W", "error::RuntimeWarning", "-m", "tomtransfer.services.cli", "analyze", "--pgg", str(f)]
    human = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert human.returncode == 0 and human.stderr == "", human.stderr
    assert "teacher: all contributions equal (7.0)" in human.stdout
    r = subprocess.run(run + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    d = json.loads(r.stdout)
    both = d["tests"]["student_finetuned_vs_teacher"]
    assert both["t"] is None and both["p_value"] is None and "Welch's t-test undefined" in both["note"]
    one = d["tests"]["teacher_vs_student_base"]  # Welch with s_teacher = 0 = the one-sample t-test of the base
    assert one["method"] == "one_sample" and one["df"] == 2
    assert one["t"] == pytest.approx((7 - 10 / 3) / (np.std([2, 5, 3], ddof=1) / math.sqrt(3)))
    assert d["notes"] and all(t["note"] for t in d["tests"].values())


def test_pgg_analysis_constant_groups_raise_no_warning():
    from tomtransfer.shared.stats import pgg_analysis

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = pgg_analysis({"teacher": [7.0] * 300, "student_base": [3, 4, 5] * 100, "student_finetuned": [6, 7] * 150})
        varying = pgg_analysis({"teacher": [8, 9, 10, 7], "student_base": [0, 2, 3, 1],
                                "student_finetuned": [4, 5, 6, 5]})
    assert res["tests"]["teacher_vs_student_base"]["method"] == "one_sample"
    welch = res["tests"]["student_finetuned_vs_student_base"]
    assert welch["method"] == "welch" and welch["note"] is None
    assert varying["notes"] == [] and all(t["method"] == "welch" for t in varying["tests"].values())


HEADER = "context,game,samples,C_student_base,C_student_finetuned,C_teacher\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("context,game,samples,C_student_base,C_teacher\nIR,prison,300,1,2\n", "missing column(s): C_student_finetuned"),
        (HEADER + "IR,prison,300,1.5,2,3\n", "is not an integer"),
        (HEADER + "IR,prison,300,301,2,3\n", "exceeds samples"),
        (HEADER + "IR,chess,300,1,2,3\n", "unknown game 'chess'"),
        (HEADER, "no data rows"),
    ],
)
def test_analyze_bad_input(tmp_path, content, message):
    f = tmp_path / "counts.csv"
    if content is not None:
        f.write_text(content)
    before = sorted(tmp_path.iterdir())
    r = cli("analyze", "--counts", f, "--json")
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == "" and sorted(tmp_path.iterdir()) == before


def test_analyze_needs_exactly_one_input():
    r = cli("analyze")
    assert r.returncode == 2 and "exactly one" in r.stderr


def test_unknown_option_is_usage_error():
    assert cli("scenarios", "list", "--colour").returncode == 2
    assert cli("scenarios", "list", "--family", "chess").returncode == 2


def test_import_lfb(tmp_path):
    out = tmp_path / "pack.yaml"
    r = cli("scenarios", "import-lfb", LFB, "--out", out)
    assert r.returncode == 0, r.stderr
    listed = json.loads(cli("scenarios", "list", "--pack", out, "--json").stdout)
    assert len(listed) == 53 + 60
    again = cli("scenarios", "import-lfb", LFB, "--out", out)
    assert again.returncode == 2 and "exists" in again.stderr
    bad = cli("scenarios", "import-lfb", tmp_path / "nowhere", "--out", tmp_path / "x.yaml")
    assert bad.returncode == 2 and not (tmp_path / "x.yaml").exists()


def test_config_validate(tmp_path):
    assert cli("config", "validate", ROOT / "configs" / "demo.yaml").returncode == 0
    assert cli("config", "validate", ROOT / "configs" / "paper.yaml").returncode == 0
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("models: {teacher: {model: a}, student: {model: b}}\ntraining: {lora: {r: 0}}\n", "training.lora.r"),
        ("models: {teacher: {model: a}}\n", "models.student"),
        ("models: {teacher: {model: a}, student: {model: b}}\nsampling: {temprature: 1}\n", "temprature"),
        ("models: [\n", "invalid YAML"),
        ("models: {teacher: {model: a, engine: openai}, student: {model: b}}\n", "base_url"),
        ("models: {teacher: {model: a}, student: {model: b}}\nscenarios: {ids: [nope]}\n", "unknown scenario id"),
    ]:
        bad.write_text(text)
        r = cli("config", "validate", bad)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (text, r.stderr)


def test_tables_in_a_log_are_not_cut(tmp_path):
    """stdout is a pipe here (as in CI or `make run > log`): headers and cells print whole, not cut to '…'."""
    r = cli("analyze", "--counts", PAPER)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and "improvement %" in r.stdout and "overcorrection" in r.stdout


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("teacher", ["no-such-model-alias", "smollm2-135m-instruct"])
def test_generate_without_a_serving_app_refuses_before_writing(teacher, tmp_path):
    """generate talks to a running app: none at the address -> one line, exit 2, in about a second, and no sample
    store, dataset or MLflow folder (it used to create its store and wait 25 s on the dead endpoint)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: g\noutput_dir: {tmp_path / 'out'}\nmodels: {{teacher: {{model: {teacher}}}, "
                   "student: {model: smollm2-135m-instruct}}\n")
    r = cli("generate", "--config", cfg, "--base-url", f"http://127.0.0.1:{_free_loopback_port()}")
    assert r.returncode == 2 and "no serving app at http://127.0.0.1:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_taken_serving_port_is_refused_before_anything_starts(tmp_path):
    """Ray Serve's proxy binds with SO_REUSEPORT, so a second local app on a port another app holds would start and
    share it (the kernel splitting connections between two apps). The preflight of every command that starts a local
    app refuses a taken serving.port in one line, exit 2, nothing written; a free port passes."""
    import socket

    from tomtransfer.services.common.checks import check_port
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.errors import UserError

    models = {"teacher": {"model": "a"}, "student": {"model": "b"}}
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Serve's proxy binds (loopback only here)
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        twin = socket.socket()  # the hazard: a second SO_REUSEPORT listener binds the same port without an error
        twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        twin.bind(("127.0.0.1", port))
        twin.close()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"name: p\noutput_dir: {tmp_path / 'out'}\nmodels: {{teacher: {{model: no-such-alias}}, "
                       f"student: {{model: no-such-alias}}}}\nserving: {{port: {port}}}\n")
        for cmd in ("serve", "run", "evaluate"):  # the port is checked before the models (an unknown alias here)
            r = cli(cmd, "--config", cfg)
            assert r.returncode == 2 and f"serving.port {port} on 127.0.0.1 is taken" in r.stderr, (cmd, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert list(tmp_path.iterdir()) == [cfg]
        with pytest.raises(UserError, match="is taken"):
            check_port(parse_config({"models": models, "serving": {"port": port}}))
    finally:
        held.close()
    check_port(parse_config({"models": models, "serving": {"port": port}}))  # free again: passes


def test_evaluate_against_a_missing_app_refuses_before_writing(tmp_path):
    """evaluate with serving.base_url talks to a running app: none there -> one line, exit 2, fast, and no run folder,
    MLflow store or report (the preflight checks the endpoint before the tracking server or a run exists)."""
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: e\noutput_dir: {tmp_path / 'out'}\nmodels: {{teacher: {{model: smollm2-135m-instruct}}, "
                   "student: {model: smollm2-135m-instruct}}\n"
                   f"serving: {{base_url: 'http://127.0.0.1:{_free_loopback_port()}'}}\n")
    t0 = time.monotonic()
    r = cli("evaluate", "--config", cfg)
    assert r.returncode == 2 and "no serving app at http://127.0.0.1:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [cfg]
    assert time.monotonic() - t0 < 30


def test_check_endpoint_reads_the_served_models(tmp_path, capsys):
    """A running app that does not serve the role is refused with what it serves; one that serves other weights under
    it (or names the same weights another way) gets a note."""
    import http.server
    import threading

    from tomtransfer.services.common.checks import check_endpoint
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.errors import UserError

    listing = {"data": [{"id": "teacher", "root": "qwen2.5-coder-0.5b-instruct"}, {"id": "student"}]}

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = json.dumps(listing).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)  # loopback only
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        ok = parse_config({"models": {"teacher": {"model": "qwen2.5-coder-0.5b-instruct"},
                                      "student": {"model": "smollm2-135m-instruct"}}})
        check_endpoint(ok, url, None, roles=("teacher", "student"))  # the student lists no root: not compared
        other = parse_config({"models": {"teacher": {"model": "qwen2.5-coder-1.5b-instruct"},
                                         "student": {"model": "smollm2-135m-instruct"}}})
        check_endpoint(other, url, None)
        assert "serves teacher = 'qwen2.5-coder-0.5b-instruct'; this config names" in capsys.readouterr().err
        listing["data"] = [{"id": "student"}]
        with pytest.raises(UserError, match="does not serve 'teacher'"):
            check_endpoint(ok, url, None)
    finally:
        srv.shutdown()

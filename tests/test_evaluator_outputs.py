"""Evaluator outputs: figures (non-empty PNGs), Table 1 in CSV / Markdown / LaTeX, the Markdown and HTML report."""

import csv
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.fixtures import synthetic_results as synthetic
from tomtransfer.services.evaluator.scoring import evaluate_exact, evaluate_samples
from tomtransfer.services.evaluator.report import write_outputs
from tomtransfer.shared.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    result = evaluate_samples(synthetic.paper_samples(), expected_samples=300, n_resamples=300)
    return write_outputs(result, tmp_path_factory.mktemp("eval"), config=load_config(CONFIG),
                         run_info={"MLflow run": "0123abcd"})


def test_figures_exist_and_are_sensible_pngs(outputs):
    names = sorted(p.name for p in outputs.figures)
    assert names == sorted([f"fig2_cooperation_{f}.png" for f in ("in_sample", "oos_context", "oos_game")]
                           + [f"fig3_improvement_{f}.png" for f in ("in_sample", "oos_context", "oos_game")]
                           + ["fig5_pgg.png", "fig0_transfer.png"])
    for p in outputs.figures:
        w, h = png_size(p)
        assert p.stat().st_size > 10_000 and 500 <= w <= 2000 and 300 <= h <= 1000, (p.name, w, h)
    # dpi 120: a 11 x 4.6 inch figure is 1320 x 552 pixels
    assert png_size(outputs.figures_dir / "fig3_improvement_in_sample.png") == (1320, 552)
    # an image with bars has many distinct colours, a blank one has one
    from matplotlib.image import imread

    img = imread(outputs.figures_dir / "fig2_cooperation_in_sample.png")
    assert len({tuple(px) for px in img[::7, ::7].reshape(-1, img.shape[-1]).round(2)}) > 20


def test_table1_files(outputs):
    t = outputs.tables_dir
    with open(t / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 22 and [r["scenario"] for r in rows[-2:]] == ["AVERAGE", "MEDIAN"]
    team = next(r for r in rows if r["scenario"] == "team_prison")
    assert team["doubled_scenario"] == "team_prison_x2" and team["n_normal"] == "300"
    assert float(team["p_normal"]) == pytest.approx(225 / 300) and float(team["z"]) == pytest.approx(1.6, abs=0.02)
    md = (t / "table1.md").read_text()
    assert "| Scenario | Normal C Ratio | OoS C Ratio | Difference | SE | z-score | p-value |" in md
    assert "| team_prison | 0.75 | 0.71 | -0.04 | 0.03 | 1.60 | 0.05 |" in md
    assert "| biz_staghunt | 0.71 | 0.63 | -0.08 | 0.03 | 3.06 | 0.00** |" in md
    assert "| AVERAGE | 0.72 | 0.71 | -0.01 |" in md
    tex = (t / "table1.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 1 and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"team\_prison & 0.75 & 0.71 & -0.04 & 0.03 & 1.60 & 0.05 \\" in tex
    assert r"0.00$^{**}$" in tex and r"\label{tab:table1}" in tex
    for name in ("scenarios.csv", "rates.csv", "summary.csv", "pgg.csv", "evaluation.json", "transfer.csv",
                 "transfer_scenarios.csv"):
        assert (t / name).stat().st_size > 100
    with open(t / "rates.csv") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == 53 * 3


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(tag)
        else:
            self.stack.pop()


def test_report_holds_the_key_numbers(outputs):
    md = outputs.report["md"].read_text()
    for needle in ("46.26", "32.33", "10.87", "2 exacerbation, 16 partial, 2 overcorrection",
                   "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "Table 1", "| team_prison | 0.75 |",
                   "Public-goods game", "Welch", "Unstable scenarios", "team_delight", "0123abcd",
                   "valid + invalid = N", "oos_context", "oos_game"):
        assert needle in md, needle
    # relative figure links resolve from the report folder
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7 and all((outputs.report_dir / link).is_file() for link in links)


def test_html_reports_relative_and_standalone(outputs):
    for key, embedded in (("html", False), ("html_standalone", True)):
        text = outputs.report[key].read_text()
        c = _Checker()
        c.feed(text)
        assert not c.errors and c.stack == [], (key, c.errors, c.stack)
        assert len(c.imgs) == 7 and "46.26" in text and "<table>" in text
        if embedded:
            assert all(s.startswith("data:image/png;base64,") for s in c.imgs)
        else:
            assert all((outputs.report_dir / s).is_file() for s in c.imgs)


def test_exact_report_states_its_conventions(tmp_path):
    groups = [g for g in synthetic.paper_groups() if g["family"] in ("in_sample", "oos_game", "pgg")]
    result = evaluate_exact(synthetic.exact_from_groups(groups), samples=300, n_resamples=300)
    out = write_outputs(result, tmp_path)
    md = out.report["md"].read_text()
    assert "estimator: exact" in md and "effective n = 300" in md and "46.26" in md
    assert "No configuration was given." in md
    assert (tmp_path / "figures" / "fig5_pgg.png").is_file() and (tmp_path / "tables" / "table1.tex").is_file()
    assert "Exact mode" in (tmp_path / "tables" / "table1.md").read_text()


def test_a_logged_config_the_schema_no_longer_reads_is_named_not_read(tmp_path):
    """`report --run-id` on an older run: a logged config that does not validate is not read as raw data; the
    report's configuration section says so, with the one-line validation error."""
    import yaml

    from tomtransfer.services.evaluator.rerun import _load_config

    logged = load_config(CONFIG).model_dump(mode="json")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(logged))
    cfg, ev, error = _load_config(good)
    assert cfg is not None and cfg.name == "demo" and error is None and ev == cfg.evaluate
    # a setting a later schema dropped, outside the evaluate section: the metric settings still come from the log
    outside = tmp_path / "outside.yaml"
    outside.write_text(yaml.safe_dump({**logged, "training": {**logged["training"], "no_such_setting": 1}}))
    cfg, ev, error = _load_config(outside)
    assert cfg is None and error.startswith("config.yaml: training.no_such_setting")
    assert ev is not None and ev.model_dump() == load_config(CONFIG).evaluate.model_dump()
    old = tmp_path / "old.yaml"
    logged["evaluate"]["no_such_setting"] = 1  # ... inside it: the evaluator's defaults
    old.write_text(yaml.safe_dump(logged))
    cfg, ev, error = _load_config(old)
    assert cfg is None and ev is None
    assert error.startswith("config.yaml: evaluate.no_such_setting") and "\n" not in error
    groups = [g for g in synthetic.paper_groups() if g["family"] == "in_sample"]
    result = evaluate_exact(synthetic.exact_from_groups(groups), samples=300, n_resamples=200)
    md = write_outputs(result, tmp_path / "out", config=cfg, config_error=error).report["md"].read_text()
    assert f"The logged config could not be read as the current schema ({error})" in md
    assert "No configuration was given." not in md and "tomtransfer evaluation report: experiment" in md


def test_console_summary(outputs):
    from tomtransfer.services.evaluator.report import pgg_lines, summary_rows

    header, rows = summary_rows(outputs.result)
    assert header[0] == "family" and [r[0] for r in rows] == ["in_sample", "oos_context", "oos_game", "all"]
    assert rows[0][2] == "46.26" and rows[0][5] == "2/16/2/0"
    assert pgg_lines(outputs.result)[0].startswith("pgg: mean contribution teacher 7.17")

"""The evaluation report: Markdown and HTML that tie the metrics, figures and tables together.

`write_outputs(result, out_dir, config=...)` (config: the typed `ExperimentConfig`, or None) writes everything the evaluate stage produces into one folder,
in the layout MLflow mirrors as artifact folders:

  out_dir/figures/*.png               (services.evaluator.figures)
  out_dir/tables/*.csv|md|tex|json    (Table 1, per-scenario, per-role, per-family, PGG, evaluation.json)
  out_dir/report/report.md            Markdown; figures as relative links (../figures/x.png)
  out_dir/report/report.html          HTML, the same relative links (open it next to figures/)
  out_dir/report/report_standalone.html   HTML with the figures embedded (base64): one self-contained file,
                                      what to mail around; it also renders inside the MLflow UI's artifact view

Sections: headline numbers, configuration, models, summary per family (mean / median / sd / se / bootstrap CI,
class counts, unstable count, alignment), cooperation rates, figures, per-scenario tables, Table 1, the
public-goods game, notes (unstable scenarios, invalid answers, exact-mode conventions).

The document is built once as a list of blocks and rendered to both formats, so they never disagree.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tomtransfer.services.evaluator.figures import (
    FAMILY_TITLES,
    ROLE_LABELS,
    TABLE1_CAPTION,
    TABLE1_HEADER,
    fmt,
    markdown_table,
    table1_rows,
    write_figures,
    write_tables,
)
from tomtransfer.services.evaluator.scoring import ROLES, EvaluationResult
from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.transfer import verdict as transfer_verdict

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_STANDALONE = "report_standalone.html"


# ------------------------------------------------------------------------------------------ document
@dataclass
class Doc:
    """Blocks: ("h", level, text) ("p", text) ("ul", [items]) ("table", header, rows) ("img", path, caption)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: list[str], rows: list[list[str]], align: str | None = None) -> None:
        """`align`: one letter a column, l or r (default: first column left, the others right)."""
        align = align or ("l" + "r" * (len(header) - 1))
        self.blocks.append(("table", list(header), [list(map(str, r)) for r in rows], align))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", Path(path), caption))

    # --------------------------------------------------------------------------- renderers
    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out += ["#" * (b[1] + 1) + " " + b[2], ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "ul":
                out += [f"- {item}" for item in b[1]] + [""]
            elif kind == "table":
                out += [markdown_table(b[1], b[2], b[3])]
            elif kind == "img":
                out += [f"![{b[2]}]({_rel(b[1], base)})", "", f"*{b[2]}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self, base: Path, embed: bool = False) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                level = min(b[1] + 1, 6)
                anchor = re.sub(r"[^a-z0-9]+", "-", b[2].lower()).strip("-")
                body.append(f'<h{level} id="{anchor}">{_inline(b[2])}</h{level}>')
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif kind == "table":
                cls = [' class="l"' if a == "l" else "" for a in b[3]]
                head = "".join(f"<th{c}>{_inline(h)}</th>" for h, c in zip(b[1], cls))
                rows = "".join("<tr>" + "".join(f"<td{c}>{_inline(v)}</td>" for v, c in zip(r, cls)) + "</tr>"
                               for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                path, caption = b[1], b[2]
                if embed:
                    src = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
                else:
                    src = html.escape(_rel(path, base), quote=True)
                body.append(f'<figure><img src="{src}" alt="{html.escape(caption, quote=True)}">'
                            f"<figcaption>{_inline(caption)}</figcaption></figure>")
        return _HTML.format(title=html.escape(self.title), body="\n".join(body))


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
        padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ border-bottom: 2px solid #1f4e79; padding-bottom: .2em; }}
h2 {{ border-bottom: 1px solid #ccc; margin-top: 1.8em; }}
table {{ border-collapse: collapse; margin: .6em 0 1.2em; font-size: .86em; }}
th, td {{ border: 1px solid #d0d0d0; padding: .25em .55em; text-align: right; }}
th {{ background: #eef3f8; }}
td.l, th.l {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
figure {{ margin: 1em 0 1.6em; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: .88em; color: #555; }}
code {{ background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }}
</style></head>
<body>
{body}
</body></html>
"""


def _rel(path: Path, base: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def _inline(text: str) -> str:
    """Escape, then the two inline Markdown forms the report uses: **bold** and `code`."""
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


# ------------------------------------------------------------------------------------------ content
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "-"


FAMILY_ORDER = ("in_sample", "oos_context", "oos_game")


def build_document(
    result: EvaluationResult,
    *,
    config: ExperimentConfig | None = None,
    config_error: str | None = None,
    figures: list[Path] | None = None,
    run_info: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Doc:
    """The report as blocks, section by section in reading order (one function a section, below). `config_error`:
    why there is no config (a logged one that does not validate against the current schema), said in its section."""
    doc = Doc(title or f"tomtransfer evaluation report: {config.name if config is not None else 'experiment'}")
    _header(doc, result, run_info)
    _headline(doc, result)
    _configuration(doc, config, config_error)
    _models(doc, result, config)
    _family_summary(doc, result)
    _rates(doc, result)
    _figures(doc, result, {p.name: p for p in figures or []})
    _per_scenario(doc, result)
    _table1(doc, result)
    _pgg(doc, result)
    _notes(doc, result)
    return doc


def _header(doc: Doc, result: EvaluationResult, run_info: Mapping[str, str] | None) -> None:
    """The lines under the title: when, which estimator and rate, the protocol, the run's links."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    est = {"exact": "exact (probabilities from one forward pass per scenario and role)",
           "mixed": "per role (see the protocol): exact probabilities for answer-only roles, samples for the rest"
           }.get(result.estimator, f"sampled ({result.samples if result.samples else 'varying'} samples per role "
                                   f"and scenario)")
    info = [f"generated {stamp}", f"estimator: {est}", f"rate: {rate_label(result)}"]
    if result.protocol:
        info.append(result.protocol)
    for k, v in (run_info or {}).items():
        if v:
            info.append(f"{k}: `{v}`")
    doc.ul(info)


def _headline(doc: Doc, result: EvaluationResult) -> None:
    """Headline: strategy first, then the paper's count-rate improvement per family, the PGG and Table 1."""
    doc.h(1, "Headline")
    st_lines = strategy_lines(result)
    if st_lines:
        doc.p("**Strategic transfer** (how far the fine-tuned student's choice *among valid answers* moved toward "
              "the teacher's, in % of the teacher-base choice gap, weighted by each scenario's information; 95 % CI "
              "by a two-level bootstrap over scenarios and every role's sampling noise; `shared/transfer.py`). "
              "Format = the change of the valid share. A transfer CI that includes 0 means the paper's improvement "
              "below is format, not strategy.")
        doc.ul(st_lines)
        header, rows = strategy_rows(result)
        doc.table(header, rows)
    doc.p("**The paper's improvement** (count rate; it moves with the valid share as well as with the choice):")
    lines = []
    for fam, f in _families(result):
        a = f.improvement
        shares = valid_shares(result, fam)
        lines.append(f"**{FAMILY_TITLES.get(fam, fam)}** ({fam}): mean improvement **{fmt(a.mean)} %** "
                     f"(median {fmt(a.median)}, se {fmt(a.se)}, 95 % CI {_ci(a.ci95)}, n = {a.n}); "
                     f"classes: {_classes(f.classes)}; {len(f.unstable)} unstable; "
                     f"{len(f.low_valid)} with a valid share under {result.min_valid_share:g}"
                     + (f" ({len(f.excluded)} left out)" if f.excluded else "") + f"; valid share {shares}")
    for sid, p in result.pgg.items():
        means = ", ".join(f"{ROLE_LABELS[r]} {fmt(d.get('mean'))}" for r, d in p.roles.items())
        lines.append(f"**public-goods game** ({sid}): mean contribution {means}; improvement {fmt(p.improvement)} %")
    if result.table1:
        sig = sum(r.p_value is not None and r.p_value < 0.05 for r in result.table1)
        avg = result.table1_summary.get("average", {})
        lines.append(f"**Table 1** (fine-tuned student, normal vs doubled payoffs): {sig} of {len(result.table1)} "
                     f"scenarios differ at p < 0.05; average difference {fmt(avg.get('difference'), 3)}")
    doc.ul(lines or ["no scenario has results for all three roles; see the rates below"])
    doc.p(f"Rates: {rate_label(result)}. "
          "Improvement = (C_ft - C_base) / (C_teacher - C_base) x 100: the percent of the teacher-base gap the "
          "fine-tuned student closed (< 0 exacerbation, 0..100 partial, > 100 overcorrection, undefined where "
          "teacher = base).")


def _configuration(doc: Doc, cfg: ExperimentConfig | None, error: str | None) -> None:
    """Configuration: the settings that shaped the numbers (or a line saying why there are none)."""
    doc.h(1, "Configuration")
    if cfg is None:
        doc.p(f"The logged config could not be read as the current schema ({error}); the metrics use its "
              "evaluate section where that part still reads, else the evaluator's default settings." if error
              else "No configuration was given.")
        return
    m, s, ev, gen, tr = cfg.models, cfg.sampling, cfg.evaluate, cfg.generate, cfg.training
    rows = [
        ["experiment", cfg.name],
        ["teacher", f"{m.teacher.model} ({m.teacher.engine})"],
        ["student", f"{m.student.model} ({m.student.engine})"],
        ["adapter", tr.adapter_name],
        ["sampling", f"T = {s.temperature}, top_p = {s.top_p}, seed = {s.seed}"],
        ["evaluate", f"protocol {ev.protocol}, estimator {ev.estimator}, {ev.samples} samples, rate {ev.rate}, "
                     f"min valid share {ev.min_valid_share}, max_tokens {ev.max_tokens}, bootstrap {ev.bootstrap}"],
        ["families", ", ".join(ev.families)],
        ["roles", ", ".join(ev.roles)],
        ["generate", f"{gen.samples} samples per scenario, instruction {gen.instruction}, targets {gen.targets}, "
                     f"families {', '.join(gen.families)}"],
        ["training", f"LoRA r = {tr.lora.r}, alpha = {tr.lora.alpha}, dropout = {tr.lora.dropout}, modules "
                     f"{', '.join(tr.lora.target_modules)}; lr {tr.learning_rate} ({tr.lr_scheduler}), "
                     f"{tr.epochs} epochs, effective batch {tr.effective_batch_size}"],
    ]
    doc.table(["setting", "value"], rows, "ll")


def _models(doc: Doc, result: EvaluationResult, cfg: ExperimentConfig | None) -> None:
    """Models: each role's served name, weights and whether it was evaluated."""
    doc.h(2, "Models")
    rows = []
    for role in ROLES:
        if role == "student_placebo" and role not in result.roles:
            continue
        served = result.models.get(role, "-")
        weights = "-"
        if cfg is not None:
            weights = (cfg.models.teacher if role == "teacher" else cfg.models.student).model
            if role == "student_finetuned":
                weights += f" + adapter {cfg.training.adapter_name}"
            if role == "student_placebo":
                weights += f" + adapter {cfg.training.adapter_name}-placebo (targets permuted across scenarios)"
        rows.append([ROLE_LABELS[role], f"`{served}`", weights, "yes" if role in result.roles else "no"])
    doc.table(["role", "served as", "weights", "evaluated"], rows, "llll")


def _family_summary(doc: Doc, result: EvaluationResult) -> None:
    """Summary per family: improvement aggregates and classes, then by game and by context."""
    doc.h(1, "Summary per family")
    header = ["family", "scenarios", "mean", "median", "sd", "se", "95 % CI", "min", "max", "exacerbation",
              "partial", "overcorrection", "undefined", "unstable", "bridging", "JS ft-teacher", "JS base-teacher"]
    rows = []
    for fam, f in _families(result, with_all=True):
        a = f.improvement
        rows.append([fam, f.scenarios, fmt(a.mean), fmt(a.median), fmt(a.sd), fmt(a.se), _ci(a.ci95), fmt(a.min),
                     fmt(a.max), *[f.classes[c] for c in ("exacerbation", "partial", "overcorrection", "undefined")],
                     len(f.unstable), fmt(f.bridging.mean), fmt(f.js_ft_teacher.mean, 4),
                     fmt(f.js_base_teacher.mean, 4)])
    if rows:
        doc.table(header, rows)
        doc.p("Improvement in percent, aggregated over scenarios (sd with ddof = 1, se = sd / sqrt(n), 95 % CI "
              "by bootstrap over scenarios). Bridging = (|p_base - p_teacher| - |p_ft - p_teacher|) / "
              "|p_base - p_teacher| (1 = reached the teacher); JS = Jensen-Shannon divergence of the C/D answer "
              "distributions (base 2, 0 = identical).")
    else:
        doc.p("No improvement could be computed (it needs all three roles on a scenario).")
    for fam, f in _families(result):
        doc.h(2, f"{fam}: improvement by game and by context")
        for kind, groups in (("game", f.by_game), ("context", f.by_context)):
            doc.table([kind, "n", "mean", "se", "95 % CI"], align="lrrrr", rows=
                      [[g, a.n, fmt(a.mean), fmt(a.se), _ci(a.ci95)] for g, a in groups.items()])


def _rates(doc: Doc, result: EvaluationResult) -> None:
    """Cooperation rates per family and role; sampled runs add every role's sample totals."""
    doc.h(1, "Cooperation rates")
    doc.p(f"Rate = {rate_label(result)} per scenario, averaged over the family's scenarios; invalid = answers that "
          "did not parse, in percent of all samples (exact mode: 1 - valid probability mass).")
    rows = []
    for fam, by_role in result.rate_means.items():
        for role, d in by_role.items():
            rows.append([fam, ROLE_LABELS[role], fmt(d["mean"], 3), _pct(d["invalid_mean"])])
    if rows:
        doc.table(["family", "role", "mean rate", "invalid %"], rows, "llrr")
    if result.estimator == "sample":
        totals = []
        for role in result.roles:
            rr = [r for r in result.rates if r.role == role]
            n, inv = sum(r.n for r in rr), sum(r.invalid or 0 for r in rr)
            totals.append(f"{ROLE_LABELS[role]}: {n} samples, {n - inv} valid, {inv} invalid "
                          f"({_pct(inv / n if n else None)} %)")
        doc.ul(totals)


def _figures(doc: Doc, result: EvaluationResult, fig_by_name: Mapping[str, Path]) -> None:
    """Figures: Fig. 2 per family, Fig. 3-4 per family, Fig. 5 per public-goods game (those that were drawn)."""
    doc.h(1, "Figures")
    for fam in result.rate_means:
        p = fig_by_name.get(f"fig2_cooperation_{fam}.png")
        if p:
            doc.img(p, f"Cooperation rate per role by context (a) and by game (b), {FAMILY_TITLES.get(fam, fam)} "
                       f"(as Fig. 2 of the paper).")
    for fam in result.families:
        p = fig_by_name.get(f"fig3_improvement_{fam}.png")
        if p:
            ref = {"in_sample": "Fig. 3", "oos_context": "Fig. 4"}.get(fam, "Figs. 3-4")
            doc.img(p, f"Improvement by game (a) and by context (b), {FAMILY_TITLES.get(fam, fam)}: bars are means "
                       f"over scenarios with +-1 se, dots are scenarios (hollow = unstable), the red line is the "
                       f"mean improvement (as {ref} of the paper).")
    for sid in result.pgg:
        p = fig_by_name.get("fig5_pgg.png" if sid == "pgg" else f"fig5_pgg_{sid}.png")
        if p:
            doc.img(p, "Average contribution to the public good per role, +-1 se in black (as Fig. 5 of the paper).")


def _per_scenario(doc: Doc, result: EvaluationResult) -> None:
    """Per-scenario results, one table per family, then the scenarios with rates but no improvement."""
    doc.h(1, "Per-scenario results")
    rate_of = {(r.scenario_id, r.role): r for r in result.rates}
    for fam in dict.fromkeys(s.family for s in result.scenarios):
        doc.h(2, f"{fam} ({FAMILY_TITLES.get(fam, fam)})")
        rows = []
        for s in result.scenarios_of(fam):
            val = "/".join(_pct(getattr(rate_of.get((s.id, r)), "valid_share", None))
                           for r in ("teacher", "student_base", "student_finetuned"))
            flag = "left out" if s.excluded else ("low" if s.low_valid else "")
            rows.append([s.id, s.game, s.context, fmt(s.p_teacher, 3), fmt(s.p_base, 3), fmt(s.p_ft, 3), val, flag,
                         fmt(s.improvement), _ci(s.ci95), s.cls, "yes" if s.unstable else "", fmt(s.bridging),
                         fmt(s.js_ft_teacher, 4)])
        doc.table(["scenario", "game", "context", "teacher", "base", "ft", "valid % t/b/ft", "low valid",
                   "improvement", "95 % CI", "class", "unstable", "bridging", "JS ft-teacher"], rows,
                  "lllrrrrlrrllrr")
    partial = sorted({r.scenario_id for r in result.rates if r.family != "pgg"} - {s.id for s in result.scenarios})
    if partial:
        doc.p(f"Scenarios with rates but no improvement (a role missing or without valid answers): "
              f"{', '.join(partial)}. Their rates are in `tables/rates.csv`.")


def _table1(doc: Doc, result: EvaluationResult) -> None:
    """Table 1: normal vs doubled payoffs of the fine-tuned student."""
    doc.h(1, "Table 1: normal vs doubled payoffs (fine-tuned student)")
    if result.table1:
        doc.table(TABLE1_HEADER, table1_rows(result))
        doc.p(TABLE1_CAPTION + " The two-sample Wald test (both rates estimated) is in `tables/table1.csv`.")
        if result.estimator == "exact":
            doc.p(f"Exact mode: proportions are probabilities; SE, z and p use an effective n = {result.samples}.")
    else:
        doc.p("Not computed: it needs the fine-tuned student on in-sample scenarios and their doubled-payoff "
              "(`_x2`) counterparts.")


def _pgg(doc: Doc, result: EvaluationResult) -> None:
    """Public-goods game: per-role contributions, improvement, bridging, JS and the Welch tests."""
    if result.pgg:
        doc.h(1, "Public-goods game")
        for sid, p in result.pgg.items():
            if len(result.pgg) > 1:
                doc.h(2, sid)
            doc.table(["role", "mean", "sd", "se", "n", "invalid %"], align="lrrrrr", rows=
                      [[ROLE_LABELS[r], fmt(d.get("mean")), fmt(d.get("sd")), fmt(d.get("se")), d.get("n"),
                        _pct(d.get("invalid_rate"))] for r, d in p.roles.items()])
            doc.p(f"Contributions 0..{p.endowment}. Improvement of the mean contribution: **{fmt(p.improvement)} %**; "
                  f"bridging {fmt(p.bridging)}; JS divergence of the contribution distributions: ft-teacher "
                  f"{fmt(p.js_ft_teacher, 4)}, base-teacher {fmt(p.js_base_teacher, 4)}.")
            if p.tests:
                doc.table(["Welch test", "difference", "t", "df", "p"],
                          [[k.replace("_vs_", " vs "), fmt(t.get("difference")), fmt(t.get("t")), fmt(t.get("df"), 1),
                            _p(t.get("p_value"))] for k, t in p.tests.items()])
            if result.estimator == "exact":
                doc.p(f"Exact mode: mean and sd of the contribution distribution (given a valid answer); "
                      f"se = sd / sqrt({result.samples}) and the Welch tests use n = {result.samples} per role.")


def _notes(doc: Doc, result: EvaluationResult) -> None:
    """Notes: unstable scenarios, how invalid answers count, the evaluator's own notes."""
    doc.h(1, "Notes")
    notes = []
    uns = result.unstable_scenarios
    if uns:
        notes.append(f"**Unstable scenarios** ({len(uns)}): {', '.join(s.id for s in uns)}. Their teacher-base gap is "
                     f"not distinguishable from sampling noise (two-proportion z-test, p >= 0.05), so their "
                     f"improvement divides by mostly noise; read them with care (hollow dots in the figures).")
    else:
        notes.append("No unstable scenarios: every teacher-base gap is outside sampling noise.")
    if result.estimator != "exact":
        notes.append("Every sample is accounted for: valid + invalid = N for every role and scenario; invalid "
                     "answers are counted, never dropped; " + ("rates use all N as the denominator (invalid counts "
                     "as not C), as the paper's counts." if result.rate_basis == "count" else
                     "rates use valid answers as the denominator."))
    notes += [n for n in result.notes if not n.startswith(f"{len(uns)} unstable scenario")]
    doc.ul(notes)


def _p(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def _classes(c: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in c.items() if v) or "-"


def _families(result: EvaluationResult, with_all: bool = False):
    fams = [(k, v) for k, v in result.families.items()]
    fams.sort(key=lambda kv: FAMILY_ORDER.index(kv[0]) if kv[0] in FAMILY_ORDER else len(FAMILY_ORDER))
    if with_all and result.overall is not None and len(fams) > 1:
        fams.append(("all", result.overall))
    return fams


def rate_label(result: EvaluationResult) -> str:
    return ("count-based, C out of all N (invalid counts as not C; the paper's counts)" if result.rate_basis == "count"
            else "conditional, C out of valid answers")


def valid_shares(result: EvaluationResult, family: str) -> str:
    """Mean valid share per role over a family's scenarios, e.g. 'teacher 91 %, base 0.4 %, ft 4.9 %'."""
    short = {"teacher": "teacher", "student_base": "base", "student_finetuned": "ft", "student_placebo": "placebo"}
    fams = [family] if family != "all" else list(result.rate_means)
    out = []
    for role in result.roles:
        v = [r.valid_share for r in result.rates if r.family in fams and r.role == role and r.valid_share is not None]
        out.append(f"{short.get(role, role)} {_pct(sum(v) / len(v)) if v else '-'} %")
    return ", ".join(out)


def _est(e, unit: str = "%", digits: int = 1) -> str:
    if e is None or e.mean is None:
        return "-"
    return f"{e.mean:+.{digits}f}{unit} {_ci(e.ci95) if e.ci95 else '[-]'}"


def _strategies(result: EvaluationResult):
    """(family, its strategy numbers, the fine-tuned student's transfer, its format change, the verdict) for every
    family where transfer was computed - what the headline table and sentences both read."""
    for fam, f in _families(result, with_all=True):
        st = f.strategy
        if st is None or "student_finetuned" not in st.transfer:
            continue
        t, fm = st.transfer["student_finetuned"], st.format.get("student_finetuned")
        yield fam, st, t, fm, transfer_verdict(t, fm.mean if fm else None, st.placebo_difference)


def strategy_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of what the product leads with: per family the fine-tuned student's strategic transfer (its
    choice among valid answers moved toward the teacher's, % with 95 % CI), the verdict, the format change (valid
    share, percentage points), the placebo difference and the association with the teacher's choices."""
    header = ["family", "n", "transfer % [95 % CI]", "verdict", "format pp", "placebo diff %", "r ft", "r base"]
    rows = []
    for fam, st, t, fm, verdict in _strategies(result):
        rows.append([fam, str(t.n), _est(t), verdict, _est(fm, " pp"),
                     _est(st.placebo_difference), _est(st.association.get("student_finetuned"), "", 2),
                     _est(st.association.get("student_base"), "", 2)])
    return header, rows




def strategy_lines(result: EvaluationResult) -> list[str]:
    """The strategic headline in sentences, one per family (console, report, logs)."""
    out = []
    for fam, st, t, fm, verdict in _strategies(result):
        line = f"{fam}: transfer {_est(t)} (n = {t.n}) - {verdict}; format {_est(fm, ' pp')} valid share"
        if st.placebo_difference is not None:
            line += f"; transfer minus placebo {_est(st.placebo_difference)}"
        elif "student_placebo" in st.transfer:
            line += f"; placebo transfer {_est(st.transfer['student_placebo'])}"
        a, b = st.association.get("student_finetuned"), st.association.get("student_base")
        line += f"; association with the teacher's choices r = {_est(a, '', 2)} (base {_est(b, '', 2)})"
        out.append(line)
    for sid, p in result.pgg.items():
        t = p.transfer.get("student_finetuned")
        if t is None:
            continue
        fp = p.format.get("student_finetuned")
        line = (f"{sid} (public goods): transfer {_est(t)} of the mean valid contribution - {transfer_verdict(t, fp, p.placebo_difference)}; "
                f"format {fmt(p.format.get('student_finetuned'), 1)} pp valid share")
        if p.placebo_difference is not None:
            line += f"; transfer minus placebo {_est(p.placebo_difference)}"
        out.append(line)
    return out


def summary_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-family summary, for a console table (`run` / `evaluate` print it)."""
    header = ["family", "n", "mean %", "median %", "95 % CI", "classes -/p/+/?", "unstable", "low valid",
              "valid % t/b/ft", "JS base>ft"]
    rows = []
    for fam, f in _families(result, with_all=True):
        a, c = f.improvement, f.classes
        shares = valid_shares(result, fam)
        vals = "/".join(part.split(" ")[1] for part in shares.split(", "))
        rows.append([fam, str(f.scenarios), fmt(a.mean), fmt(a.median), _ci(a.ci95),
                     "/".join(str(c[k]) for k in ("exacerbation", "partial", "overcorrection", "undefined")),
                     str(len(f.unstable)), f"{len(f.low_valid)}" + (f" ({len(f.excluded)} out)" if f.excluded else ""),
                     vals, f"{fmt(f.js_base_teacher.mean, 3)}>{fmt(f.js_ft_teacher.mean, 3)}"])
    return header, rows


def pgg_lines(result: EvaluationResult) -> list[str]:
    """One console line per public-goods scenario: mean contribution per role and the improvement."""
    out = []
    for sid, p in result.pgg.items():
        means = ", ".join(f"{ROLE_LABELS[r]} {fmt(d.get('mean'))} +- {fmt(d.get('se'))}" for r, d in p.roles.items())
        out.append(f"{sid}: mean contribution {means}; improvement {fmt(p.improvement)} %")
    return out


# ------------------------------------------------------------------------------------------ writing
def write_report(
    result: EvaluationResult,
    report_dir: str | Path,
    *,
    figures: list[Path] | None = None,
    config: ExperimentConfig | None = None,
    config_error: str | None = None,
    run_info: Mapping[str, str] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = build_document(result, config=config, config_error=config_error, figures=figures, run_info=run_info,
                         title=title)
    paths = {}
    for key, name, text in (("md", REPORT_MD, doc.markdown(out)), ("html", REPORT_HTML, doc.html(out)),
                            ("html_standalone", REPORT_STANDALONE, doc.html(out, embed=True))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
        paths[key] = out / name
    return paths


@dataclass(frozen=True)
class Outputs:
    root: Path
    figures: list[Path]
    tables: list[Path]
    report: dict[str, Path]
    result: EvaluationResult | None = None

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


def write_outputs(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    config: ExperimentConfig | None = None,
    config_error: str | None = None,
    run_info: Mapping[str, str] | None = None,
) -> Outputs:
    """Figures, tables and the report under `out_dir` (figures/, tables/, report/)."""
    root = Path(out_dir)
    figures = write_figures(result, root / "figures")
    tables = write_tables(result, root / "tables")
    report = write_report(result, root / "report", figures=figures, config=config, config_error=config_error,
                          run_info=run_info)
    return Outputs(root=root, figures=figures, tables=tables, report=report, result=result)

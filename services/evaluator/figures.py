"""Figures in the paper's spirit (matplotlib, Agg, PNG at 120 dpi) and the tables (CSV, Markdown, LaTeX).

Figures (`write_figures`, file names are stable; MLflow logs them under `figures/`):

  fig2_cooperation_{family}.png   Fig. 2: cooperation rate (the evaluation's rate basis) per role with the valid
                                  share below it, (a) by context and
                                  (b) by game - grouped bars, one bar per role, the mean over the group's scenarios
  fig3_improvement_{family}.png   Figs. 3-4: improvement by (a) game and (b) context: bars = mean over scenarios
                                  with +-1 se, dots = scenarios (hollow = unstable), the red dashed line = the
                                  family's mean improvement. Paper: Fig. 3 = in_sample, Fig. 4 = oos_context;
                                  oos_game gets the same figure.
  fig5_pgg.png                    Fig. 5: mean contribution to the public good per role, +-1 se in black

Tables (`write_tables`, under `tables/`): Table 1 as `table1.csv` (full precision, with the two-sample test
columns), `table1.md` and `table1.tex` (the paper's layout, 2 decimals, stars, AVERAGE / MEDIAN lines);
`scenarios.csv` (one row a scenario), `rates.csv` (one row a role x scenario), `summary.csv` (one row a family),
`pgg.csv` (one row a role) and `evaluation.json` (`EvaluationResult.to_dict()`).

Matplotlib is used through `matplotlib.figure.Figure` (no pyplot global state), so the Agg canvas is used
whatever backend the process has configured, and figures can be drawn from several threads.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from tomtransfer.services.evaluator.scoring import ROLES, EvaluationResult

DPI = 120
ROLE_COLORS = {"teacher": "#1f4e79", "student_base": "#e08214", "student_finetuned": "#2e8b57",
               "student_placebo": "#9e9e9e"}
ROLE_LABELS = {"teacher": "teacher", "student_base": "student (base)", "student_finetuned": "student (fine-tuned)",
               "student_placebo": "student (placebo)"}
FAMILY_TITLES = {
    "in_sample": "in-sample scenarios",
    "oos_context": "out-of-sample contexts",
    "oos_game": "out-of-sample games (payoffs x2)",
    "all": "all 2x2 scenarios",
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(path)
    return path


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (role, vals) in enumerate(series.items()):
        ys = [np.nan if v is None else v for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, label=ROLE_LABELS.get(role, role),
               color=ROLE_COLORS.get(role), edgecolor="white", linewidth=0.5)
    ax.set_xticks(x, groups, rotation=20, ha="right")


# ------------------------------------------------------------------------------------------- Fig. 2
def fig_cooperation(result: EvaluationResult, family: str, path: str | Path) -> Path | None:
    by_role = result.rate_means.get(family)
    if not by_role:
        return None
    fig = _figure(11, 7.8)
    axes = fig.subplots(2, 2, sharey="row", height_ratios=[3, 2])
    for col, kind, letter in ((0, "context", "a"), (1, "game", "b")):
        groups = list(dict.fromkeys(k for d in by_role.values() for k in d[kind]))
        for row, key in ((0, kind), (1, f"valid_{kind}")):
            ax = axes[row][col]
            series = {role: [by_role[role].get(key, {}).get(g) for g in groups] for role in ROLES if role in by_role}
            _grouped_bars(ax, groups, series)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(f"({letter}) by {kind}")
                ax.axhline(0.5, color="0.6", lw=0.6, ls=":")
                ax.tick_params(labelbottom=False)
    basis = "C out of N" if result.rate_basis == "count" else "P(C | valid answer)"
    axes[0][0].set_ylabel(f"cooperation rate  {basis}")
    axes[1][0].set_ylabel("valid share")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Cooperation by context and game - {FAMILY_TITLES.get(family, family)}")
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------------------- Figs. 3-4
def fig_improvement(result: EvaluationResult, family: str, path: str | Path) -> Path | None:
    summary = result.families.get(family)
    scen = [s for s in result.scenarios_of(family) if s.improvement is not None]
    if summary is None or not scen:
        return None
    fig = _figure(11, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    mean = summary.improvement.mean
    rng = np.random.default_rng(0)
    for ax, kind, groups, letter in ((axes[0], "game", summary.by_game, "a"),
                                     (axes[1], "context", summary.by_context, "b")):
        names = list(groups)
        x = np.arange(len(names))
        means = [np.nan if groups[g].mean is None else groups[g].mean for g in names]
        ses = [0 if groups[g].se is None else groups[g].se for g in names]
        ax.bar(x, means, 0.6, yerr=ses, color="#8fb3d9", edgecolor="#1f4e79", capsize=3,
               error_kw={"ecolor": "black", "lw": 1}, label="mean over scenarios (+-1 se)", zorder=2)
        for i, g in enumerate(names):
            pts = [s for s in scen if getattr(s, kind) == g]
            jitter = rng.uniform(-0.15, 0.15, len(pts))
            for s, j in zip(pts, jitter):
                ax.scatter(i + j, s.improvement, s=18, zorder=3, linewidths=0.8, edgecolors="black",
                           facecolors="none" if s.unstable else "black")
        if mean is not None:
            ax.axhline(mean, color="red", ls="--", lw=1.3, label=f"mean improvement {mean:.1f} %", zorder=4)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.axhline(100, color="0.6", lw=0.6, ls=":")
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_title(f"({letter}) by {kind}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("improvement (% of the teacher-base gap closed)")
    handles, labels = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker="o", mfc="black", mec="black", ms=4),
                Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=4)]
    labels += ["scenario", "scenario (unstable)"]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Improvement of the fine-tuned student - {FAMILY_TITLES.get(family, family)}")
    return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------- Fig. 5
def fig_pgg(result: EvaluationResult, path: str | Path, scenario_id: str = "pgg") -> Path | None:
    p = result.pgg.get(scenario_id)
    if p is None:
        return None
    roles = [r for r in ("student_base", "student_finetuned", "student_placebo", "teacher") if r in p.roles
             and p.roles[r].get("mean") is not None]
    if not roles:
        return None
    fig = _figure(6, 4.2)
    ax = fig.subplots()
    means = [p.roles[r]["mean"] for r in roles]
    ses = [p.roles[r]["se"] or 0 for r in roles]
    ax.bar(range(len(roles)), means, 0.6, yerr=ses, capsize=6, color=[ROLE_COLORS[r] for r in roles],
           error_kw={"ecolor": "black", "lw": 1.5})
    for i, (m, s) in enumerate(zip(means, ses)):
        ax.text(i, m + s + p.endowment * 0.02, f"{m:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(roles)), [ROLE_LABELS[r] for r in roles])
    ax.set_ylim(0, p.endowment * 1.08)
    ax.set_ylabel(f"mean contribution (0..{p.endowment})")
    ax.grid(axis="y", alpha=0.3)
    title = "Public-goods game: average contribution (+-1 se)"
    ax.set_title(title if scenario_id == "pgg" else f"{title}\n{scenario_id}")
    return _save(fig, Path(path))


def fig_transfer(result: EvaluationResult, path: str | Path) -> Path | None:
    """Fig. 0 (the product's headline): strategic transfer per family with its 95 % CI (placebo beside it where
    trained), and the format change (valid share, percentage points) in a second panel."""
    fams = [(k, f) for k, f in list(result.families.items()) + [("all", result.overall)]
            if f is not None and f.strategy is not None and "student_finetuned" in f.strategy.transfer]
    if not fams:
        return None
    fig = _figure(10, 3.6)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    roles = [r for r in ("student_finetuned", "student_placebo") if r in fams[0][1].strategy.transfer]
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        for j, (_, f) in enumerate(fams):
            e = f.strategy.transfer.get(role)
            if e is None or e.mean is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            err = None if e.ci95 is None else [[e.mean - e.ci95[0]], [e.ci95[1] - e.mean]]
            ax.bar(x, e.mean, width, yerr=err, capsize=3, color=f"C{i}", label=ROLE_LABELS[role] if j == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(fams)), [k for k, _ in fams])
    ax.set_ylabel("transfer, % of the teacher-base choice gap")
    ax.set_title("Strategic transfer (choice among valid answers, 95 % CI)")
    ax.legend(fontsize=8)
    for j, (_, f) in enumerate(fams):
        e = f.strategy.format.get("student_finetuned")
        if e is not None and e.mean is not None:
            err = None if e.ci95 is None else [[e.mean - e.ci95[0]], [e.ci95[1] - e.mean]]
            bx.bar(j, e.mean, 0.6, yerr=err, capsize=3, color="C2")
    bx.axhline(0, color="black", lw=0.8)
    bx.set_xticks(range(len(fams)), [k for k, _ in fams])
    bx.set_ylabel("valid share, fine-tuned - base (pp)")
    bx.set_title("Format")
    return _save(fig, Path(path))


def write_figures(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    made: list[Path | None] = [fig_transfer(result, out / "fig0_transfer.png")]
    for fam in list(result.rate_means):
        made.append(fig_cooperation(result, fam, out / f"fig2_cooperation_{fam}.png"))
    for fam in result.families:
        made.append(fig_improvement(result, fam, out / f"fig3_improvement_{fam}.png"))
    for sid in result.pgg:
        name = "fig5_pgg.png" if sid == "pgg" else f"fig5_pgg_{sid}.png"
        made.append(fig_pgg(result, out / name, sid))
    return [p for p in made if p is not None]


# ------------------------------------------------------------------------------------------- tables
def fmt(x, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


TABLE1_HEADER = ["Scenario", "Normal C Ratio", "OoS C Ratio", "Difference", "SE", "z-score", "p-value"]


def table1_rows(result: EvaluationResult) -> list[list[str]]:
    """Table 1 as the paper prints it (2 decimals, stars on the p-value), with AVERAGE and MEDIAN lines."""
    rows = [[r.id, fmt(r.p_normal), fmt(r.p_doubled), fmt(r.difference), fmt(r.se), fmt(r.z),
             fmt(r.p_value) + r.stars] for r in result.table1]
    for line in ("average", "median"):
        s = result.table1_summary.get(line)
        if s:
            rows.append([line.upper(), fmt(s["p_normal"]), fmt(s["p_doubled"]), fmt(s["difference"]), fmt(s["se"]),
                         fmt(s["z"]), fmt(s["p_value"])])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    def esc(s) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---:" if a == "c" else ":---" for a in align]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _tex_cell(cell) -> str:
    """Escape a cell; trailing significance stars become a superscript (0.05* -> 0.05$^{*}$)."""
    m = re.fullmatch(r"(.*?)(\*+)", str(cell))
    return tex_escape(m.group(1)) + f"$^{{{m.group(2)}}}$" if m else tex_escape(cell)


def latex_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, label: str,
                summary_rows: int = 0) -> str:
    """A booktabs table; the last `summary_rows` rows are set off by a rule (Table 1's AVERAGE / MEDIAN)."""
    cols = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[ht]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    body = list(rows)
    for i, row in enumerate(body):
        if summary_rows and i == len(body) - summary_rows:
            out.append(r"\midrule")
        out.append(" & ".join(_tex_cell(c) for c in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex_escape(caption)}}}", rf"\label{{{label}}}",
            r"\end{table}"]
    return "\n".join(out) + "\n"


TABLE1_CAPTION = ("Difference in proportion z-score testing for the propensity to cooperate of the fine-tuned "
                  "student in in-sample games vs the same games with doubled payoffs (out-of-sample games). "
                  "z = (p_normal - p_doubled) / sqrt(p_normal (1 - p_normal) / n), one-sided p; "
                  "* p < 0.05, ** p < 0.01, *** p < 0.001.")

TABLE1_CSV_COLUMNS = ["scenario", "doubled_scenario", "n_normal", "n_doubled", "p_normal", "p_doubled", "difference",
                      "se", "z", "p_value", "stars", "se_two_sample", "z_two_sample", "p_two_sided", "ci95_low",
                      "ci95_high"]


def write_table1(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """table1.csv / table1.md / table1.tex; nothing (an empty dict) when there is no Table 1."""
    if not result.table1:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_rows = []
    for r in result.table1:
        csv_rows.append([r.id, _doubled_id(result, r.id), r.n_normal, r.n_doubled, r.p_normal, r.p_doubled,
                         r.difference, r.se, r.z, r.p_value, r.stars, r.se_two_sample, r.z_two_sample,
                         r.p_two_sided, r.ci95[0] if r.ci95 else None, r.ci95[1] if r.ci95 else None])
    for line in ("average", "median"):
        s = result.table1_summary.get(line)
        if s:
            csv_rows.append([line.upper(), "", "", "", s["p_normal"], s["p_doubled"], s["difference"], s["se"],
                             s["z"], s["p_value"], "", "", "", "", "", ""])
    paths = {"csv": _write_csv(out / "table1.csv", TABLE1_CSV_COLUMNS, csv_rows)}
    rows = table1_rows(result)
    n_summary = sum(1 for line in ("average", "median") if result.table1_summary.get(line))
    note = f"\n{TABLE1_CAPTION}\n"
    if result.estimator == "exact":
        note += f"\nExact mode: proportions are probabilities; SE, z and p use an effective n = {result.samples}.\n"
    paths["md"] = _write_text(out / "table1.md", "**Table 1**\n\n" + markdown_table(TABLE1_HEADER, rows) + note)
    paths["tex"] = _write_text(out / "table1.tex", latex_table(TABLE1_HEADER, rows, TABLE1_CAPTION, "tab:table1",
                                                               summary_rows=n_summary))
    return paths


def _doubled_id(result: EvaluationResult, normal_id: str) -> str:
    ids = [s.scenario_id for s in result.rates if s.family == "oos_game" and s.scenario_id.startswith(normal_id + "_x")]
    return ids[0] if ids else ""


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else v for v in row])
    tmp.replace(path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


SCENARIO_COLUMNS = ["scenario", "family", "context", "game", "p_teacher", "p_base", "p_ft", "improvement", "class",
                    "unstable", "low_valid", "excluded", "ci95_low", "ci95_high", "bridging", "js_base_teacher", "js_ft_teacher"]
RATE_COLUMNS = ["role", "source", "model", "scenario", "family", "context", "game", "n", "valid", "invalid",
                "cooperate", "rate", "rate_count", "rate_conditional", "valid_share", "invalid_rate", "valid_mass"]
SUMMARY_COLUMNS = ["family", "scenarios", "mean", "median", "sd", "se", "ci95_low", "ci95_high", "min", "max",
                   "exacerbation", "partial", "overcorrection", "undefined", "unstable", "bridging_mean",
                   "js_base_teacher_mean", "js_ft_teacher_mean"]
PGG_COLUMNS = ["scenario", "role", "mean", "sd", "se", "n", "invalid_rate", "improvement"]


def write_tables(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = list(write_table1(result, out).values())
    paths.append(_write_csv(out / "scenarios.csv", SCENARIO_COLUMNS, [
        [s.id, s.family, s.context, s.game, s.p_teacher, s.p_base, s.p_ft, s.improvement, s.cls, s.unstable,
         s.low_valid, s.excluded, s.ci95[0] if s.ci95 else None, s.ci95[1] if s.ci95 else None, s.bridging, s.js_base_teacher,
         s.js_ft_teacher] for s in result.scenarios]))
    paths.append(_write_csv(out / "rates.csv", RATE_COLUMNS, [
        [r.role, r.source, r.model, r.scenario_id, r.family, r.context, r.game, r.n, r.valid, r.invalid, r.cooperate,
         r.rate, r.rate_count, r.rate_conditional, r.valid_share, r.invalid_rate, r.valid_mass]
        for r in result.rates]))
    rows = []
    for f in list(result.families.values()) + ([result.overall] if result.overall else []):
        a = f.improvement
        rows.append([f.family, f.scenarios, a.mean, a.median, a.sd, a.se, a.ci95[0] if a.ci95 else None,
                     a.ci95[1] if a.ci95 else None, a.min, a.max, *[f.classes[c] for c in
                     ("exacerbation", "partial", "overcorrection", "undefined")], len(f.unstable), f.bridging.mean,
                     f.js_base_teacher.mean, f.js_ft_teacher.mean])
    paths.append(_write_csv(out / "summary.csv", SUMMARY_COLUMNS, rows))
    if result.pgg:
        paths.append(_write_csv(out / "pgg.csv", PGG_COLUMNS, [
            [sid, role, d.get("mean"), d.get("sd"), d.get("se"), d.get("n"), d.get("invalid_rate"), p.improvement]
            for sid, p in result.pgg.items() for role, d in p.roles.items()]))
    paths.append(_write_csv(out / "transfer_scenarios.csv", TRANSFER_SCENARIO_COLUMNS, transfer_scenario_rows(result)))
    paths.append(_write_csv(out / "transfer.csv", TRANSFER_COLUMNS, transfer_rows(result)))
    paths.append(result.to_json(out / "evaluation.json"))
    return paths


TRANSFER_SCENARIO_COLUMNS = [
    "scenario_id", "family", "context", "game", "q_teacher", "q_base", "q_ft", "q_placebo", "valid_teacher",
    "valid_base", "valid_ft", "valid_placebo", "source_teacher", "source_base", "source_ft", "source_placebo",
    "improvement",
    "improvement_format", "improvement_choice"]
TRANSFER_COLUMNS = [
    "family", "group", "role", "scenarios", "n", "transfer", "transfer_ci_low", "transfer_ci_high", "format_pp",
    "format_ci_low", "format_ci_high", "association", "association_ci_low", "association_ci_high", "placebo_difference",
    "placebo_ci_low", "placebo_ci_high", "note"]


def transfer_scenario_rows(result: EvaluationResult) -> list[list]:
    """Per 2x2 scenario: every role's choice among valid answers (q) and valid share, how it was measured, and the
    paper's improvement with its format / choice split - the table behind the transfer headline."""
    by = {}
    for r in result.rates:
        if r.family != "pgg":
            by.setdefault(r.scenario_id, {})[r.role] = r
    imp = {s.id: s for s in result.scenarios}
    rows = []
    for sid, rr in by.items():
        first = next(iter(rr.values()))
        g = lambda role, attr: getattr(rr[role], attr) if role in rr else None  # noqa: E731
        s = imp.get(sid)
        rows.append([sid, first.family, first.context, first.game,
                     *[g(r, "rate_conditional") for r in ("teacher", "student_base", "student_finetuned",
                                                           "student_placebo")],
                     *[g(r, "valid_share") for r in ("teacher", "student_base", "student_finetuned", "student_placebo")],
                     *[g(r, "source") for r in ("teacher", "student_base", "student_finetuned", "student_placebo")],
                     s.improvement if s else None, s.improvement_format if s else None,
                     s.improvement_choice if s else None])
    return rows


def transfer_rows(result: EvaluationResult) -> list[list]:
    """Per family (and by game / context within it) and student role: transfer, format, association, placebo."""
    rows = []
    fams = list(result.families.values()) + ([result.overall] if result.overall else [])
    for f in fams:
        groups = [("all", f.strategy)] + [(f"game:{k}", v) for k, v in f.strategy_by_game.items()] + \
            [(f"context:{k}", v) for k, v in f.strategy_by_context.items()]
        for name, st in groups:
            if st is None:
                continue
            for role, t in st.transfer.items():
                fm, a = st.format.get(role), st.association.get(role)
                pl = st.placebo_difference if role == "student_finetuned" else None
                rows.append([f.family, name, role, st.scenarios, t.n, t.mean, *(t.ci95 or (None, None)),
                             fm.mean if fm else None, *((fm.ci95 if fm else None) or (None, None)),
                             a.mean if a else None, *((a.ci95 if a else None) or (None, None)),
                             pl.mean if pl else None, *((pl.ci95 if pl else None) or (None, None)), t.note or ""])
    return rows

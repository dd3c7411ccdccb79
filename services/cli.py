"""`tomtransfer`: the command line. Thin: parse arguments, call the domain core or a service, print.

Errors a user can fix (`shared.errors.UserError`) print one line on stderr and exit with code 2;
nothing is written when input is bad. Heavy libraries (torch, ray, mlflow) are imported inside the
commands that need them, so `scenarios` / `analyze` / `config` answer instantly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Transfer strategic decision making from a teacher LLM to a student LLM, and measure it.")
scenarios_app = typer.Typer(no_args_is_help=True, help="The scenario catalog and scenario packs.")
config_app = typer.Typer(no_args_is_help=True, help="Experiment configs.")
from services.common.models_cli import app as models_app  # noqa: E402  (light: imports no torch)
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# --------------------------------------------------------------------------------------- scenarios
@scenarios_app.command("list")
def scenarios_list(
    family: Optional[str] = typer.Option(None, "--family", help="in_sample | oos_context | oos_game | pgg"),
    pack: list[Path] = typer.Option([], "--pack", help="extra scenario pack YAML (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List scenarios (53 built in, plus packs)."""
    from shared.scenarios import FAMILIES, build_catalog

    if family is not None and family not in FAMILIES:
        fail(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    catalog = build_catalog(pack)
    rows = [s.summary() for s in catalog.select([family] if family else None)]
    if as_json:
        return _json(rows)
    table = Table("id", "family", "context", "game", "scale", title=f"{len(rows)} scenarios")
    for r in rows:
        table.add_row(r["id"], r["family"], r["context"], r["game"], f"{r['payoff_scale']:g}")
    out.print(table)


@scenarios_app.command("show")
def scenarios_show(
    scenario_id: str,
    instruction: str = typer.Option("answer_only", help="answer_only | answer_motivation"),
    pack: list[Path] = typer.Option([], "--pack"),
) -> None:
    """Print a scenario's chat messages and its game analysis."""
    from shared.games import Game, analyze
    from shared.prompts import INSTRUCTIONS, build_messages
    from shared.scenarios import build_catalog

    if instruction not in INSTRUCTIONS:
        fail(f"unknown instruction {instruction!r}; expected one of {', '.join(INSTRUCTIONS)}")
    catalog = build_catalog(pack)
    if scenario_id not in catalog.scenarios:
        fail(f"unknown scenario {scenario_id!r} (see `tomtransfer scenarios list`)")
    s = catalog.scenarios[scenario_id]
    for m in build_messages(s, instruction):  # type: ignore[arg-type]
        out.rule(m["role"])
        out.print(m["content"], highlight=False)
    if isinstance(s.game, Game):
        a = analyze(s.game)
        out.rule("analysis")
        out.print(f"class: {a.dilemma}; pure Nash: {a.pure_nash}; Pareto-optimal: {a.pareto_optimal}")


@scenarios_app.command("import-lfb")
def scenarios_import_lfb(
    path: Path = typer.Argument(..., help="root of the paper's repository (data/context, new contexts, data/game)"),
    out_file: Path = typer.Option(Path("lfb-pack.yaml"), "--out", "-o", help="where to write the pack"),
    prefix: str = typer.Option("lfb_", help="id prefix, so imported ids never clash with built-in ones"),
    force: bool = typer.Option(False, help="overwrite --out if it exists"),
) -> None:
    """Import the paper's stimuli as a scenario pack (texts kept byte for byte)."""
    from shared.lfb import read_lfb
    from shared.packs import dump_pack, pack_from_data
    from shared.scenarios import default_catalog

    if out_file.exists() and not force:
        fail(f"{out_file} exists (use --force to overwrite)")
    contexts, games, scenarios = read_lfb(path, prefix)
    text = dump_pack(contexts, games, scenarios)
    import yaml

    pack = pack_from_data(yaml.safe_load(text), str(out_file), default_catalog())  # validate before writing
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out_file)
    out.print(f"wrote {out_file}: {len(contexts)} contexts, {len(games)} games, {len(pack.scenarios)} scenarios")


# ------------------------------------------------------------------------------------------ config
@config_app.command("validate")
def config_validate(file: Path) -> None:
    """Check an experiment config; prints the resolved config summary."""
    from shared.config import load_config
    from shared.scenarios import build_catalog

    cfg = load_config(file)
    try:
        catalog = build_catalog(cfg.scenarios.packs)
        catalog.select(cfg.scenarios.families, cfg.scenarios.ids)
    except KeyError as e:
        fail(f"{file}: scenarios: {e.args[0]}")
    out.print(f"[green]ok[/] {file}: experiment {cfg.name!r}, teacher {cfg.models.teacher.model} "
              f"({cfg.models.teacher.engine}), student {cfg.models.student.model} ({cfg.models.student.engine})",
              soft_wrap=True)


@config_app.command("show-defaults")
def config_show_defaults() -> None:
    """Print the JSON schema of the experiment config (every option with its default)."""
    from shared.config import ExperimentConfig

    _json(ExperimentConfig.model_json_schema())


# ----------------------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    counts: Optional[Path] = typer.Option(None, "--counts", help="context,game,samples,C_student_base,C_student_finetuned,C_teacher"),
    ztest: Optional[Path] = typer.Option(None, "--ztest", help="context,game,samples,C_normal,C_doubled"),
    pgg: Optional[Path] = typer.Option(None, "--pgg", help="role,contribution"),
    as_json: bool = typer.Option(False, "--json"),
    bootstrap: int = typer.Option(2000, min=100, help="bootstrap resamples for CIs"),
) -> None:
    """The paper's analyses from count tables: improvement (--counts), Table 1 (--ztest), PGG (--pgg)."""
    from shared import analysis
    from shared.scenarios import default_catalog

    chosen = [x for x in (counts, ztest, pgg) if x is not None]
    if len(chosen) != 1:
        fail("give exactly one of --counts, --ztest, --pgg")
    games = default_catalog().games.keys()
    if counts is not None:
        result = analysis.analyze_counts(analysis.read_counts(counts, games), bootstrap)
        if as_json:
            return _json(result)
        t = Table("scenario", "improvement %", "class", "95% CI", "unstable", title="improvement per scenario")
        for s in result["scenarios"]:
            ci = s["ci95"]
            t.add_row(s["id"], _fmt(s["improvement"]), s["class"], f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-",
                      "yes" if s["unstable"] else "")
        out.print(t)
        o = result["overall"]
        out.print(f"overall: mean {_fmt(o['mean'])}  median {_fmt(o['median'])}  sd {_fmt(o['sd'])}  "
                  f"se {_fmt(o['se'])}  n {o['n']}  min {_fmt(o['min'])}  max {_fmt(o['max'])}")
        for key in ("by_game", "by_context"):
            g = Table(key.replace("by_", ""), "mean", "se", "n", title=key)
            for k, v in result[key].items():
                g.add_row(k, _fmt(v["mean"]), _fmt(v["se"]), str(v["n"]))
            out.print(g)
    elif ztest is not None:
        result = analysis.analyze_ztest(analysis.read_ztest(ztest, games))
        if as_json:
            return _json(result)
        t = Table("scenario", "normal", "doubled", "diff", "SE", "z", "p", "", title="Table 1: normal vs doubled payoffs")
        for r in result["rows"]:
            t.add_row(r["id"], _fmt(r["p_normal"]), _fmt(r["p_doubled"]), _fmt(r["difference"]), _fmt(r["se"]),
                      _fmt(r["z"]), _fmt(r["p_value"]), r["stars"])
        out.print(t)
    else:
        result = analysis.analyze_pgg(analysis.read_pgg(pgg))
        if as_json:
            return _json(result)
        t = Table("role", "mean", "sd", "se", "n", title="public-goods game contributions")
        for role, m in result["roles"].items():
            t.add_row(role, _fmt(m["mean"]), _fmt(m["sd"]), _fmt(m["se"]), str(m["n"]))
        out.print(t)
        out.print(f"improvement: {_fmt(result['improvement'])} %")
        for name, test in result["tests"].items():
            out.print(f"Welch {name}: diff {_fmt(test['difference'])}, t {_fmt(test['t'])}, p {_fmt(test['p_value'], 4)}")


def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

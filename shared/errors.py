"""Errors a user can fix. Their message is one line; the CLI prints it and exits with code 2."""


class UserError(ValueError):
    """Bad input at a boundary (a config, a CSV, a CLI argument, a scenario pack)."""

"""Reading the analysis CSVs with validation: every problem becomes one line naming the file and row."""

from __future__ import annotations

import csv
from pathlib import Path

from tomtransfer.shared.errors import UserError


class TableError(UserError):
    pass


def read_rows(path: str | Path, required: list[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise TableError(f"{path}: missing column(s): {', '.join(missing)}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError:
        raise TableError(f"{path}: not a UTF-8 text CSV") from None
    except csv.Error as err:
        raise TableError(f"{path}: malformed CSV ({err})") from None
    if not rows:
        raise TableError(f"{path}: no data rows")
    return rows


def as_int(path: str | Path, line: int, column: str, value: str, minimum: int = 0) -> int:
    try:
        n = int(value)
    except ValueError:
        raise TableError(f"{path}: line {line}: {column} = {value!r} is not an integer") from None
    if n < minimum:
        raise TableError(f"{path}: line {line}: {column} = {n} must be >= {minimum}")
    return n


def as_float(path: str | Path, line: int, column: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise TableError(f"{path}: line {line}: {column} = {value!r} is not a number") from None

"""`tomtransfer analyze`: the paper's analyses from count tables (CSV in, JSON-ready dicts out).

Used on the paper's own numbers (golden tests) and on this project's evaluation results alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tomtransfer.shared.metrics import Counts, aggregate, class_counts, group_by, scenario_result
from tomtransfer.shared.stats import PGG_ROLES, pgg_analysis, table1_summary, table1_ztest
from tomtransfer.shared.tables import TableError, as_float, as_int, read_rows

COUNT_COLUMNS = ["context", "game", "samples", "C_student_base", "C_student_finetuned", "C_teacher"]
ZTEST_COLUMNS = ["context", "game", "samples", "C_normal", "C_doubled"]
PGG_COLUMNS = ["role", "contribution"]


def _check_game(path: Path, line: int, game: str, known: Iterable[str]) -> None:
    known = set(known)
    if game not in known:
        raise TableError(f"{path}: line {line}: unknown game {game!r} (known: {', '.join(sorted(known))})")


def _check_count(path: Path, line: int, column: str, count: int, samples: int) -> None:
    if count > samples:
        raise TableError(f"{path}: line {line}: {column} = {count} exceeds samples = {samples}")


def read_counts(path: str | Path, known_games: Iterable[str]) -> list[Counts]:
    path = Path(path)
    rows = read_rows(path, COUNT_COLUMNS)
    known = list(known_games)
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        _check_game(path, i, row["game"], known)
        if not row["context"]:
            raise TableError(f"{path}: line {i}: empty context")
        samples = as_int(path, i, "samples", row["samples"], minimum=1)
        c = {k: as_int(path, i, k, row[k]) for k in COUNT_COLUMNS[3:]}
        for k, v in c.items():
            _check_count(path, i, k, v, samples)
        family = row.get("family") or "in_sample"
        sid = f"{row['context']}_{row['game']}" + ("_x2" if family == "oos_game" else "")
        if (family, sid) in seen:
            raise TableError(f"{path}: line {i}: duplicate scenario {sid} ({family})")
        seen.add((family, sid))
        out.append(Counts(
            id=sid, samples=samples, c_base=c["C_student_base"], c_ft=c["C_student_finetuned"],
            c_teacher=c["C_teacher"], game=row["game"], context=row["context"], family=family,
        ))
    return out


def analyze_counts(counts: list[Counts], n_resamples: int = 2000) -> dict:
    results = [scenario_result(c, n_resamples) for c in counts]
    families = {r.family for r in results}
    out = {
        "overall": aggregate([r.improvement for r in results], n_resamples).to_dict(),
        "scenarios": [r.to_dict() for r in results],
        "by_game": {k: v.to_dict() for k, v in group_by(results, "game", n_resamples).items()},
        "by_context": {k: v.to_dict() for k, v in group_by(results, "context", n_resamples).items()},
        "classes": class_counts(results),
    }
    if len(families) > 1:
        out["by_family"] = {k: v.to_dict() for k, v in group_by(results, "family", n_resamples).items()}
    return out


def read_ztest(path: str | Path, known_games: Iterable[str]) -> list[tuple[str, int, int, int]]:
    path = Path(path)
    rows = read_rows(path, ZTEST_COLUMNS)
    known = list(known_games)
    out = []
    for i, row in enumerate(rows, start=2):
        _check_game(path, i, row["game"], known)
        samples = as_int(path, i, "samples", row["samples"], minimum=1)
        cn = as_int(path, i, "C_normal", row["C_normal"])
        cd = as_int(path, i, "C_doubled", row["C_doubled"])
        _check_count(path, i, "C_normal", cn, samples)
        _check_count(path, i, "C_doubled", cd, samples)
        out.append((f"{row['context']}_{row['game']}", samples, cn, cd))
    return out


def analyze_ztest(rows: list[tuple[str, int, int, int]]) -> dict:
    tests = [table1_ztest(sid, cn, n, cd, n) for sid, n, cn, cd in rows]
    return {"rows": [t.to_dict() | {"stars": t.stars} for t in tests], "summary": table1_summary(tests)}


def read_pgg(path: str | Path, endowment: float | None = None) -> dict[str, list[float]]:
    path = Path(path)
    rows = read_rows(path, PGG_COLUMNS)
    data: dict[str, list[float]] = {}
    for i, row in enumerate(rows, start=2):
        role = row["role"]
        if role not in PGG_ROLES:
            raise TableError(f"{path}: line {i}: unknown role {role!r} (expected one of {', '.join(PGG_ROLES)})")
        x = as_float(path, i, "contribution", row["contribution"])
        if x < 0 or (endowment is not None and x > endowment):
            raise TableError(f"{path}: line {i}: contribution {x:g} outside 0..{endowment:g}")
        data.setdefault(role, []).append(x)
    missing = [r for r in PGG_ROLES if r not in data]
    if missing:
        raise TableError(f"{path}: no rows for role(s): {', '.join(missing)}")
    return data


def analyze_pgg(data: dict[str, list[float]]) -> dict:
    return pgg_analysis(data)

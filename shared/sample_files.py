"""Bring your own samples: a file of raw responses -> parsed samples, ready for the evaluator's metrics.

`tomtransfer analyze --samples FILE` reads FILE (format by extension: `.parquet`/`.pq`, `.jsonl`/`.ndjson`,
`.csv`), one row a response, with columns

  role          teacher | student_base | student_finetuned                                   (required)
  scenario      a scenario id of the built-in catalog (`shared.scenarios.default_catalog()`) (required)
  response      the model's raw text; empty / null = an invalid sample                      (required)
  context, game, family    needed for ids not in the catalog (family defaults to `pgg` when game is `pgg`,
                           else `custom`); for catalog ids they are optional and must agree with the catalog
  sample_index  optional whole number, unique per (role, scenario); default: the row's position in its group
  model         optional, carried into the result

Each response is parsed with the documented rule (`shared.parsing`): `parse_choice` for 2x2 games,
`parse_contribution(text, endowment)` for public-goods games (the catalog's endowment; 10 for a PGG id not in
the catalog). The result has the columns `services.evaluator.scoring.evaluate_samples` requires (role,
scenario_id, family, context, game, sample_index, answer, valid) plus `response` and `row` (the 1-based data
row in FILE). Group sizes may differ. Anything wrong raises `SampleFileError` with a one-line message.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tomtransfer.shared.config import ALL_ROLES
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.parsing import parse_choice, parse_contribution

REQUIRED = ("role", "scenario", "response")
OPTIONAL = ("context", "game", "family", "sample_index", "model")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
CUSTOM_FAMILY = "custom"
DEFAULT_ENDOWMENT = 10  # the paper's public-goods game, for PGG ids not in the catalog
OUTPUT_COLUMNS = ("role", "scenario_id", "family", "context", "game", "sample_index", "answer", "valid",
                  "response", "row")


class SampleFileError(UserError):
    """A samples file that cannot be analysed; the message is one line naming the file (and the row)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def file_format(path: str | Path) -> str:
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SampleFileError(f"{path}: unknown format {path.suffix or '(no extension)'!r}; "
                              f"expected one of {', '.join(FORMATS)}")
    return fmt


def read_sample_file(path: str | Path) -> pd.DataFrame:
    """The rows of FILE as read by pandas / pyarrow (not yet validated beyond being readable and non-empty)."""
    path = Path(path)
    if not path.exists():
        raise SampleFileError(f"file not found: {path}")
    if not path.is_file():
        raise SampleFileError(f"{path}: not a file")
    fmt = file_format(path)
    try:
        if fmt == "csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        else:
            import pyarrow.parquet as pq

            df = pq.read_table(path).to_pandas()
    except UnicodeDecodeError:
        raise SampleFileError(f"{path}: not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        raise SampleFileError(f"{path}: empty file") from None
    except pd.errors.ParserError as e:
        raise SampleFileError(f"{path}: malformed CSV ({_one_line(e)})") from None
    except (ValueError, OSError) as e:  # malformed JSON lines; pyarrow.ArrowInvalid (not Parquet) is a ValueError
        kind = {"jsonl": "JSON lines", "parquet": "Parquet", "csv": "CSV"}[fmt]
        raise SampleFileError(f"{path}: not a readable {kind} file ({_one_line(e)})") from None
    if df.shape[1] == 0 and df.shape[0] == 0:
        raise SampleFileError(f"{path}: empty file")
    df.columns = [c.strip() if isinstance(c, str) else c for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SampleFileError(f"{path}: missing column(s): {', '.join(missing)}")
    if df.empty:
        raise SampleFileError(f"{path}: no data rows")
    return df


def _missing(x) -> bool:
    return x is None or x is pd.NA or x is pd.NaT or (isinstance(x, float) and math.isnan(x))


def _text(x) -> str:
    return "" if _missing(x) else str(x).strip()


def _contribution(value) -> str | None:
    """The parsed contribution as the evaluator's answer string ('7', '7.5'), None if invalid."""
    if value is None:
        return None
    f = float(value)
    return str(int(f)) if f.is_integer() else repr(f)


def parse_samples(raw: pd.DataFrame, path: str | Path = "samples", catalog=None) -> pd.DataFrame:
    """Validate the rows and parse each response; see the module docstring for the columns."""
    from tomtransfer.shared.scenarios import default_catalog

    catalog = catalog or default_catalog()
    path = Path(path)
    cols = set(raw.columns)
    records = raw.to_dict(orient="records")
    rows: list[dict] = []
    meta: dict[str, tuple[str, str, str, int | None]] = {}  # scenario id -> family, context, game, endowment
    for i, rec in enumerate(records, start=1):
        where = f"{path}: row {i}"
        role = _text(rec["role"])
        if role not in ALL_ROLES:
            raise SampleFileError(f"{where}: unknown role {role!r} (expected one of {', '.join(ALL_ROLES)})")
        sid = _text(rec["scenario"])
        if not sid:
            raise SampleFileError(f"{where}: empty scenario")
        given = {k: _text(rec[k]) if k in cols else "" for k in ("family", "context", "game")}
        if sid not in meta:
            meta[sid] = _scenario_meta(sid, given, catalog, where)
        family, context, game, endowment = meta[sid]
        for k, v in (("family", family), ("context", context), ("game", game)):
            if given[k] and given[k] != v and not (k == "game" and _same_game(catalog, sid, given[k])):
                raise SampleFileError(f"{where}: scenario {sid} has {k} {v!r}, the row says {given[k]!r}")
        text = rec["response"]
        text = None if _missing(text) else str(text)
        if family == "pgg":
            answer = _contribution(parse_contribution(text, endowment or DEFAULT_ENDOWMENT))
        else:
            answer = parse_choice(text)
        row = {"role": role, "scenario_id": sid, "family": family, "context": context, "game": game,
               "sample_index": _sample_index(rec.get("sample_index"), where) if "sample_index" in cols else None,
               "answer": answer, "valid": answer is not None, "response": text, "row": i}
        if "model" in cols:
            row["model"] = _text(rec["model"]) or None
        rows.append(row)
    df = pd.DataFrame(rows)
    if "sample_index" not in cols:
        df["sample_index"] = df.groupby(["role", "scenario_id"], sort=False).cumcount()
    df["sample_index"] = df["sample_index"].astype("int64")
    dup = df.duplicated(subset=["role", "scenario_id", "sample_index"], keep="first")
    if dup.any():
        r = df[dup].iloc[0]
        raise SampleFileError(f"{path}: row {r['row']}: duplicate sample_index {r['sample_index']} for "
                              f"{r['role']} {r['scenario_id']}")
    return df


def load_samples(path: str | Path, catalog=None) -> pd.DataFrame:
    """`read_sample_file` + `parse_samples`."""
    return parse_samples(read_sample_file(path), path, catalog)


def _same_game(catalog, sid: str, game: str) -> bool:
    s = catalog.scenarios.get(sid)
    return s is not None and game in (s.game_id, s.game.id)


def _scenario_meta(sid: str, given: dict[str, str], catalog, where: str) -> tuple[str, str, str, int | None]:
    s = catalog.scenarios.get(sid)
    if s is not None:
        return s.family, s.context.id, s.game_id, getattr(s.game, "endowment", None)
    if not (given["context"] and given["game"]):
        raise SampleFileError(f"{where}: unknown scenario {sid!r} (not in the built-in catalog; give context and "
                              f"game columns for it, see `tomtransfer scenarios list`)")
    family = given["family"] or ("pgg" if given["game"] == "pgg" else CUSTOM_FAMILY)
    return family, given["context"], given["game"], DEFAULT_ENDOWMENT if family == "pgg" else None


def _sample_index(value, where: str) -> int:
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise SampleFileError(f"{where}: empty sample_index")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise SampleFileError(f"{where}: sample_index {value!r} is not a whole number") from None
    if not f.is_integer() or f < 0:
        raise SampleFileError(f"{where}: sample_index {value!r} is not a whole number >= 0")
    return int(f)

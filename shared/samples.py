"""The sample: one home for what a sample is and how it is read.

- the roles and the served-name rule (`served_model`: which served model answers for a role);
- the Parquet schemas of raw samples (`SAMPLE_SCHEMA`, one row a sample) and of exact-mode rows (`EXACT_SCHEMA`,
  one row per role and scenario), with their keys;
- `read_samples`: the one reader of sample files, used by the training set, the metrics and `analyze`.
The store that writes them (crash-safe shards, compaction, resume) is `services.collector.store`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa

from tomtransfer.shared.config import ALL_ROLES as _ALL_ROLES, CORE_ROLES as _CORE_ROLES
from tomtransfer.shared.errors import UserError

# ROLES (= ALL_ROLES): every role a row may carry, in reporting order: teacher, student_base, student_finetuned,
# student_placebo (`training.placebo`: the same recipe trained on the same dataset with its completions permuted
# across scenarios, a control). CORE_ROLES: the three every evaluation has and the paper's statistics need.
ROLES: tuple[str, ...] = tuple(_ALL_ROLES)
ALL_ROLES = ROLES
CORE_ROLES: tuple[str, ...] = tuple(_CORE_ROLES)
ROLE_MODELS = {"teacher": "teacher", "student_base": "student"}  # the adapter roles: student:<adapter>
ADAPTER_SUFFIX = {"student_finetuned": "", "student_placebo": "-placebo"}  # adapter role -> suffix of its name


def adapter_name(role: str, base_name: str) -> str:
    """The adapter an adapter role is served with: `training.adapter_name` (+ `-placebo` for the placebo)."""
    return f"{base_name}{ADAPTER_SUFFIX[role]}"


def served_model(role: str, adapter_name_: str | None = None) -> str:
    """The model name a role is served under: `teacher`, `student`, `student:<adapter>`,
    `student:<adapter>-placebo`."""
    if role in ROLE_MODELS:
        return ROLE_MODELS[role]
    if role in ADAPTER_SUFFIX:
        if not adapter_name_:
            raise UserError(f"role {role} needs an adapter name (training.adapter_name)")
        return f"student:{adapter_name(role, adapter_name_)}"
    raise UserError(f"unknown role {role!r}; expected one of {', '.join(ALL_ROLES)}")



# Who answered what, in both kinds of rows: the run, the role and its served model, the scenario.
_IDENTITY = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("scenario_id", pa.string(), nullable=False),
    pa.field("family", pa.string(), nullable=False),
    pa.field("context", pa.string(), nullable=False),
    pa.field("game", pa.string(), nullable=False),
]

# One row a sample. `seed` is the seed sent with the request that produced the row; `request_n` is that
# request's `n` and `choice_index` the row's position among its choices: (seed, request_n, choice_index)
# re-draws the sample from a server that is deterministic in (seed, n).
SAMPLE_SCHEMA = pa.schema(_IDENTITY + [
    pa.field("sample_index", pa.int64(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("messages", pa.string(), nullable=False),  # JSON chat list (the prompt)
    pa.field("response", pa.string(), nullable=False),
    pa.field("answer", pa.string()),  # 'C' / 'D', the PGG contribution as a number string ('7', '7.5'), or null
    pa.field("valid", pa.bool_(), nullable=False),
    pa.field("latency_s", pa.float64()),  # wall time of the request that produced the row
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("finish_reason", pa.string()),
    pa.field("request_n", pa.int64()),
    pa.field("choice_index", pa.int64()),
])
SAMPLE_KEY = ("role", "scenario_id", "sample_index")

# One row per (role, scenario) from exact mode: probabilities at temperature T, no sampling noise
# (definitions: services/teacher/exact.py). p_C / p_D / pgg_dist are unconditional probabilities that
# a response *starts with* that answer; valid_mass is their sum; the *_given_valid columns condition on it.
# `part`: null where the row is the role's whole measurement (an exact-mode student); "lead" where it is only the
# leading-answer mass of a sampled role (the teacher under `evaluate.teacher_lead`, on its motivated prompt: p_C /
# p_D = P(the response starts with C / D), valid_mass = p_C + p_D; the rest comes from its samples). Files written
# before the column existed read with part null.
EXACT_SCHEMA = pa.schema(_IDENTITY + [
    pa.field("temperature", pa.float64()),
    pa.field("p_C", pa.float64()),  # null for the PGG
    pa.field("p_D", pa.float64()),
    pa.field("p_C_given_valid", pa.float64()),
    pa.field("valid_mass", pa.float64()),
    pa.field("invalid_mass", pa.float64()),
    pa.field("unresolved_mass", pa.float64()),
    pa.field("pgg_dist", pa.string()),  # PGG: JSON list [P(0), ..., P(endowment)] (unconditional), else null
    pa.field("mean_given_valid", pa.float64()),  # PGG: mean contribution given a valid answer
    pa.field("messages", pa.string(), nullable=False),
    pa.field("latency_s", pa.float64()),
    pa.field("raw", pa.string()),  # the endpoint's JSON answer, verbatim
    pa.field("part", pa.string()),  # null: the whole measurement; "lead": the leading-answer mass only
])
EXACT_KEY = ("role", "scenario_id")  # within one store; a lead row and a whole one live in different stores
LEAD_PART = "lead"

SAMPLES_FILE = "samples.parquet"
EXACT_FILE = "exact.parquet"


class SampleFileError(UserError):
    """Sample files that cannot be read as asked (missing, no Parquet, columns lacking)."""


def sample_files(paths: str | Path | Iterable[str | Path], error: type[UserError] = SampleFileError) -> list[Path]:
    """Parquet files from files and folders (recursively); a folder's `exact.parquet` is exact rows, not samples."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.parquet") if q.is_file() and q.name != EXACT_FILE)
            if not found:
                raise error(f"no Parquet files under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise error(f"samples not found: {p}")
    if not files:
        raise error("no samples given")
    return files


def read_samples(paths: str | Path | Iterable[str | Path], *, columns: Sequence[str] | None = None,
                 required: Sequence[str] = (), error: type[UserError] = SampleFileError):
    """Samples from Parquet files or folders as one DataFrame. `columns`: read only these (those present), to
    keep memory small; `required`: columns that must be there; `error`: the caller's error type."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for f in sample_files(paths, error):
        names = pq.read_schema(f).names
        frames.append(pd.read_parquet(f, columns=[c for c in names if c in columns] if columns else None))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise error(f"samples lack column(s): {', '.join(missing)}")
    return df


_KEY_LABELS = {"role": "role", "run_id": "run", "scenario_id": "scenario", "sample_index": "index"}


def check_unique(df, key: Sequence[str] = SAMPLE_KEY, *, error: type[Exception] = SampleFileError) -> None:
    """No two rows of the samples DataFrame `df` share `key` (default `SAMPLE_KEY`; the training set's is
    run_id, scenario_id, sample_index): else `error` naming how many rows and one of them, e.g. "4 duplicate
    samples, e.g. role teacher scenario pgg index 3"."""
    dup = df.duplicated(subset=list(key), keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        where = " ".join(f"{_KEY_LABELS.get(k, k)} {first[k]}" for k in key)
        raise error(f"{int(dup.sum())} duplicate samples, e.g. {where}")

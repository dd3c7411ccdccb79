"""Sample storage: the Parquet schema of raw samples and exact-mode rows, and a crash-safe, resumable store.

Used by `generate` (teacher samples) and by the sampled / exact estimators of `evaluate`, through
`services.collector.runner`.

Layout of a store folder (e.g. `<run_dir>/generate/<key>/samples/`):

  samples.parquet        the compacted store (written by `compact()`); the one file other stages read
  shards/*.shard         one Parquet file per completed request block (not named *.parquet on purpose,
                         so a reader globbing `*.parquet` never sees shards and the compacted file twice)
  manifest.json          run id and the settings every row was made with (a resume with other settings
                         is refused instead of silently mixing two experiments)
  .lock                  held by the one writer (a second `generate` on the same folder is refused)

Crash safety: a shard is written to a hidden temporary file, flushed, fsync'ed, then renamed into place
(`os.replace`, atomic on POSIX) and the folder is fsync'ed. A kill -9 at any instant therefore leaves
either the whole shard or no shard; temporaries are never read and are removed by the next writer.
There is no separate bookkeeping to get out of step: what is done is *exactly* the set of rows in the
shards. Reads deduplicate by the store's key (samples: `(role, scenario_id, sample_index)`; exact rows:
`(role, scenario_id)`), first occurrence wins (compacted file first, then shards oldest first), so even a
crash between `compact()`'s rename and its deletion of the merged shards can never yield a duplicate.

Determinism (see `sample_seed` and `plan_requests`): indices of a (role, scenario) are cut into fixed
blocks of `block_size`; block b holds indices [b*k, (b+1)*k) (the last one may be shorter) and is asked for
in one request with `n` = its length and `seed` = the seed of its first index. A block is written as one
shard or not at all, so after an interruption the missing indices are whole blocks, re-requested with the
same (seed, n) as in an uninterrupted run: given a server that returns the same samples for the same
(seed, n), a resumed run holds exactly the rows an uninterrupted run holds. (Only if N itself grows after a
partial last block was written is a block split: its missing tail is asked for as its own request, seeded
by the tail's first index - deterministic, but not what a from-scratch run with the larger N would draw.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tomtransfer.shared.errors import UserError

log = logging.getLogger(__name__)

from tomtransfer.shared.samples import (  # noqa: F401  (re-exported: the store's schema lives with the sample)
    ALL_ROLES, EXACT_FILE, EXACT_KEY, EXACT_SCHEMA, LEAD_PART, ROLES, SAMPLE_KEY, SAMPLE_SCHEMA, SAMPLES_FILE,
)

SHARD_DIR = "shards"
SHARD_SUFFIX = ".shard"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class StoreError(UserError):
    """A store that cannot be used as asked (held by another writer, made with other settings)."""


# ------------------------------------------------------------------------------------------- seeds
def sample_seed(base_seed: int, role: str, scenario_id: str, index: int) -> int:
    """The seed of sample `index` of (role, scenario): a stable hash, in [0, 2**31) so every server takes it."""
    digest = hashlib.sha256(f"tomtransfer|{int(base_seed)}|{role}|{scenario_id}|{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF


@dataclass(frozen=True)
class Request:
    """One HTTP request's worth of samples: indices [start, start + n) of (role, scenario)."""

    start: int
    n: int
    seed: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.n)


def plan_requests(have: Iterable[int], total: int, block_size: int, *, base_seed: int, role: str,
                  scenario_id: str) -> list[Request]:
    """The requests that fill indices [0, total) not in `have`: per fixed block, each maximal run of missing
    indices (in practice the whole block, since blocks are written all or nothing), seeded by its first index."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    present = set(have)
    out: list[Request] = []
    for b0 in range(0, total, block_size):
        b1 = min(b0 + block_size, total)
        i = b0
        while i < b1:
            if i in present:
                i += 1
                continue
            j = i
            while j < b1 and j not in present:
                j += 1
            out.append(Request(i, j - i, sample_seed(base_seed, role, scenario_id, i)))
            i = j
    return out


# ------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(final: Path, mode: str, write) -> Path:
    """`write(fh)` into a hidden temporary beside `final`, flushed and fsync'ed, then renamed into place: `final` is
    either absent/old or the complete new file, even on kill -9."""
    final = Path(final)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
    return final


def atomic_write_parquet(table: pa.Table, final: Path) -> Path:
    return _atomic_write(final, "wb", lambda fh: pq.write_table(table, fh, compression="zstd"))


def atomic_write_json(data: object, final: Path) -> None:
    def write(fh) -> None:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")

    _atomic_write(final, "w", write)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order and types (missing nullable columns become nulls)."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            cols.append(pa.nulls(len(table), field.type))
        else:
            raise StoreError(f"rows lack required column {field.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def dedup_first(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """Rows of `table` with the first occurrence of each key (in table order)."""
    if table.num_rows == 0:
        return table
    row = "__row__"
    t = table.append_column(row, pa.array(range(table.num_rows), pa.int64()))
    first = t.group_by(list(key), use_threads=False).aggregate([(row, "min")])
    keep = pc.sort_indices(first.column(f"{row}_min"))
    idx = pc.take(first.column(f"{row}_min"), keep)
    return table.take(idx)


# ------------------------------------------------------------------------------------------- store
class ShardStore:
    """A folder of atomically written Parquet shards plus one compacted file, deduplicated by `key` on read.

    Reading needs no lock. Writing (`write`, `compact`, `set_manifest`) happens inside `with store.writer():`,
    which takes an exclusive lock on the folder (released by the OS if the process dies) and removes
    temporaries left by a killed writer."""

    def __init__(self, root: str | Path, schema: pa.Schema, key: Sequence[str], compact_name: str):
        self.root = Path(root)
        self.schema = schema
        self.key = tuple(key)
        self.compact_path = self.root / compact_name
        self.shard_dir = self.root / SHARD_DIR
        self._lock = None

    # --- locking
    def writer(self) -> "ShardStore":
        return self

    def __enter__(self) -> "ShardStore":
        from filelock import FileLock, Timeout

        self.shard_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / ".lock"), is_singleton=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(f"{self.root} is being written by another process (lock {self.root / '.lock'})") from None
        self._lock = lock
        for d in (self.root, self.shard_dir):
            for p in d.glob(f"{_TMP_PREFIX}*"):
                with suppress(OSError):
                    p.unlink()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _need_lock(self) -> None:
        if self._lock is None:
            raise RuntimeError("write to a ShardStore inside `with store.writer():`")

    # --- files
    def shard_paths(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.iterdir() if p.name.endswith(SHARD_SUFFIX) and p.is_file())

    def _files(self) -> list[Path]:
        """Compacted file first, then shards oldest first: the order 'first wins' follows."""
        head = [self.compact_path] if self.compact_path.is_file() else []
        return head + self.shard_paths()

    def _read_file(self, path: Path, columns: list[str] | None) -> pa.Table | None:
        try:
            t = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            # Cannot come from our own writes (fsync + rename); only from outside damage. Set the file aside
            # (when we hold the lock) so its rows count as missing and get re-requested.
            log.warning("unreadable shard %s (%s); its rows will be requested again", path, e)
            if self._lock is not None:
                bad = self.root / "corrupt"
                bad.mkdir(exist_ok=True)
                with suppress(OSError):
                    os.replace(path, bad / path.name)
            return None
        if columns is None:
            return conform(t, self.schema)
        return conform(t, pa.schema([self.schema.field(c) for c in columns]))

    def read(self, columns: list[str] | None = None, *, sort: bool = True) -> pa.Table:
        """All rows, deduplicated by key (first wins), sorted by key."""
        cols = None if columns is None else list(dict.fromkeys([*self.key, *columns]))
        schema = self.schema if cols is None else pa.schema([self.schema.field(c) for c in cols])
        parts = [t for t in (self._read_file(p, cols) for p in self._files()) if t is not None]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        table = dedup_first(table, self.key)
        if sort and table.num_rows:
            table = table.sort_by([(k, "ascending") for k in self.key])
        return table.select(columns) if columns is not None else table

    def write(self, rows: list[dict] | pa.Table) -> Path:
        """One shard, atomically. Returns its path."""
        self._need_lock()
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        table = conform(table, self.schema)
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}{SHARD_SUFFIX}"
        return atomic_write_parquet(table, self.shard_dir / name)

    def compact(self) -> Path:
        """Merge the compacted file and every shard into a new compacted file (atomically), then drop the shards.

        A crash before the rename leaves the old state; after it, the new file plus shards whose rows it
        already holds (deduplicated on read, removed by the next compact)."""
        self._need_lock()
        shards = self.shard_paths()
        if not shards and self.compact_path.is_file():
            return self.compact_path
        table = self.read()
        atomic_write_parquet(table, self.compact_path)
        for p in shards:
            with suppress(FileNotFoundError):
                p.unlink()
        _fsync_dir(self.shard_dir)
        return self.compact_path

    # --- manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def set_manifest(self, data: dict) -> None:
        self._need_lock()
        atomic_write_json(data, self.manifest_path)


class SampleStore(ShardStore):
    """Raw samples, one row a sample, key (role, scenario_id, sample_index)."""

    def __init__(self, root: str | Path):
        super().__init__(root, SAMPLE_SCHEMA, SAMPLE_KEY, SAMPLES_FILE)

    def indices(self) -> dict[tuple[str, str], set[int]]:
        """Per (role, scenario_id), the sample indices already stored."""
        t = self.read(list(SAMPLE_KEY), sort=False)
        out: dict[tuple[str, str], set[int]] = {}
        for role, sid, i in zip(*(t.column(c).to_pylist() for c in SAMPLE_KEY)):
            out.setdefault((role, sid), set()).add(i)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        return {k: len(v) for k, v in self.indices().items()}


class ExactStore(ShardStore):
    """Exact-mode rows, one per (role, scenario_id). `part`: written into every row's `part` column (e.g. "lead"
    for the teacher's leading-answer mass, `shared.samples.LEAD_PART`); None: the rows are whole measurements."""

    def __init__(self, root: str | Path, part: str | None = None):
        super().__init__(root, EXACT_SCHEMA, EXACT_KEY, EXACT_FILE)
        self.part = part

    def write(self, rows: list[dict] | pa.Table) -> Path:
        if self.part is not None:
            if isinstance(rows, pa.Table):
                rows = rows.to_pylist()
            rows = [{**r, "part": self.part} for r in rows]
        return super().write(rows)

    def done(self) -> set[tuple[str, str]]:
        t = self.read(list(EXACT_KEY), sort=False)
        return set(zip(t.column("role").to_pylist(), t.column("scenario_id").to_pylist()))


# The manifest's format, one for every store (`collection.collect_into` writes it). Stores written before the
# collection sequence had one home recorded 1 (generate, the soft-label set's exact rows) or 3 (evaluate) for the
# same manifest and rows: both read as this version.
MANIFEST_VERSION = 3
_SAME_AS_CURRENT = (1, 3)


def _version(manifest: dict):
    v = manifest.get("version")
    return MANIFEST_VERSION if v in _SAME_AS_CURRENT else v


def check_manifest(store: ShardStore, expected: dict) -> dict:
    """Record `expected` (run id + settings) in a new store, or check an existing store was made with the same.

    `expected["roles"]` (role -> model description) may grow between runs (evaluating another role later);
    every other key, and every role already recorded, must match (the version as `_version` reads it). Returns
    the manifest in force."""
    current = store.manifest()
    if current is None:
        store.set_manifest(expected)
        return expected
    diffs = [k for k in sorted(set(current) | set(expected)) if k != "roles" and
             (_version(current) != _version(expected) if k == "version" else current.get(k) != expected.get(k))]
    old_roles, new_roles = current.get("roles", {}), expected.get("roles", {})
    diffs += [f"roles.{r}" for r in sorted(set(old_roles) & set(new_roles)) if old_roles[r] != new_roles[r]]
    if diffs:
        k = diffs[0]
        def get(d: dict, key: str):
            return d.get("roles", {}).get(key[6:]) if key.startswith("roles.") else d.get(key)
        raise StoreError(
            f"{store.root} holds samples made with other settings ({k}: {get(current, k)!r} there, "
            f"{get(expected, k)!r} now); use another experiment name or output_dir, or delete that folder"
        )
    merged = {**current, "roles": {**old_roles, **new_roles}}
    if merged != current:
        store.set_manifest(merged)
    return merged

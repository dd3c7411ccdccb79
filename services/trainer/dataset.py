"""Teacher samples -> a training set, its exports, its dataset card, and its MLflow dataset input.

Input: the generate stage's raw samples (Parquet, one row a sample; see `SAMPLE_COLUMNS`).
Output (`export_training_set`), all in one folder:

  train.parquet          the training set (one row an example; see `TRAIN_COLUMNS`) - what `train` reads
  train_alpaca.json      LLaMA-Factory `alpaca` format  (system / instruction / input / output)
  train_sharegpt.json    LLaMA-Factory `sharegpt` format (system / conversations[from, value])
  dataset_info.json      LLaMA-Factory registry entry naming both files
  DATASET_CARD.md        teacher, scenarios, counts, C-rate and invalid rate per scenario, content hash
  dataset_meta.json      the card's numbers, machine-readable

Policies: `valid_policy` = `valid_only` (drop samples whose answer did not parse; the paper trained on
valid answers) or `all` (keep every sample with a non-empty response). `targets` = `answer_motivation`
(the response text exactly as the teacher generated it) or `answer` (just the parsed answer: `C`, `D`,
or a PGG contribution such as `7` - the motivation ablation). With `answer` targets a sample with no
parsed answer has nothing to train on and is dropped whatever the policy; the card counts it.

Content hash: sha256 over the canonical rows of the training set - rows in their canonical order
(scenario, run, sample index), each row as compact JSON with sorted keys, joined by newlines. It hashes
content, not Parquet bytes, so it is the same whatever pyarrow version writes the file. MLflow limits a
dataset digest to 36 characters: the MLflow digest is the first 32 hex digits, the full hash is a tag.

Placebo (`placebo_training_set`, `export_placebo_set`; `training.placebo`): the same training set with its targets
(answer and motivation together, with their parsed answer) permuted across examples by a permutation seeded with
`sampling.seed`: every prompt keeps its place, every completion moves to another scenario's prompt where possible
(2x2 and public-goods completions among their own kind), so the multiset of completions, their format and the
overall C share are those of the real set while the scenario -> choice mapping is gone. Written like a training set
(train.parquet with `source_example_id` / `source_scenario_id`: where each completion came from, the exports, a
card that names the seed and the source set's content hash).

No torch, ray or mlflow at import time (mlflow is imported inside `log_dataset_to_mlflow`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import pandas as pd

from tomtransfer.shared.errors import UserError

Targets = Literal["answer_motivation", "answer"]
ValidPolicy = Literal["valid_only", "all"]

SAMPLE_COLUMNS: tuple[str, ...] = (
    "run_id", "model", "scenario_id", "family", "context", "game", "sample_index", "seed",
    "messages", "response", "answer", "valid", "latency_s", "prompt_tokens", "completion_tokens",
)
TRAIN_COLUMNS: tuple[str, ...] = (
    "example_id", "run_id", "teacher", "scenario_id", "family", "context", "game", "sample_index", "seed",
    "system", "user", "messages", "target", "answer", "valid",
)
TRAIN_PARQUET = "train.parquet"
ALPACA_JSON = "train_alpaca.json"
SHAREGPT_JSON = "train_sharegpt.json"
DATASET_INFO_JSON = "dataset_info.json"
CARD_MD = "DATASET_CARD.md"
META_JSON = "dataset_meta.json"
MLFLOW_DIGEST_LEN = 32  # MLflow's dataset digest column holds at most 36 characters


class DatasetError(UserError):
    """Samples that cannot be turned into a training set (missing columns, duplicates, nothing left)."""


# ----------------------------------------------------------------------------------------- loading
def load_samples(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Read raw samples from Parquet files or folders of them (`shared.samples.read_samples`); checks the columns."""
    from tomtransfer.shared.samples import read_samples  # lazy: it needs pydantic; the training loop reads this module without

    return read_samples(paths, required=SAMPLE_COLUMNS, error=DatasetError)


def _prompt_messages(raw: str, where: str) -> list[dict[str, str]]:
    try:
        msgs = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise DatasetError(f"{where}: `messages` is not a JSON chat list") from None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise DatasetError(f"{where}: `messages` is not a list of {{role, content}}")
    # The response lives in `response`; a trailing assistant turn (if a writer kept one) is not prompt.
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    roles = [m["role"] for m in msgs]
    if roles not in (["user"], ["system", "user"]):
        raise DatasetError(f"{where}: expected a [system,] user prompt, got roles {roles}")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


# ---------------------------------------------------------------------------------------- building
_CANONICAL_ORDER = ["scenario_id", "run_id", "sample_index"]


def build_training_set(
    samples: pd.DataFrame, *, targets: Targets = "answer_motivation", valid_policy: ValidPolicy = "valid_only"
) -> pd.DataFrame:
    """Samples -> training examples (`TRAIN_COLUMNS`), in canonical order."""
    if targets not in ("answer_motivation", "answer"):
        raise DatasetError(f"unknown targets {targets!r}; expected answer_motivation or answer")
    if valid_policy not in ("valid_only", "all"):
        raise DatasetError(f"unknown valid policy {valid_policy!r}; expected valid_only or all")
    from tomtransfer.shared.samples import check_unique  # lazy: it needs pydantic (as `load_samples`)

    check_unique(samples, ("run_id", "scenario_id", "sample_index"), error=DatasetError)
    rows = []
    for s in samples.sort_values(_CANONICAL_ORDER, kind="stable").itertuples(index=False):
        valid = bool(s.valid)
        answer = None if s.answer is None or (isinstance(s.answer, float) and pd.isna(s.answer)) else str(s.answer)
        if valid_policy == "valid_only" and not valid:
            continue
        if targets == "answer":
            if answer is None:
                continue
            target = answer
        else:
            target = s.response if isinstance(s.response, str) else ""
            if not target.strip():
                continue
        where = f"{s.scenario_id}#{s.sample_index}"
        msgs = _prompt_messages(s.messages, where)
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        rows.append({
            "example_id": f"{s.run_id}:{s.scenario_id}:{int(s.sample_index)}",
            "run_id": str(s.run_id),
            "teacher": str(s.model),
            "scenario_id": str(s.scenario_id),
            "family": str(s.family),
            "context": str(s.context),
            "game": str(s.game),
            "sample_index": int(s.sample_index),
            "seed": int(s.seed),
            "system": system,
            "user": msgs[-1]["content"],
            "messages": json.dumps(msgs, ensure_ascii=False),
            "target": target,
            "answer": answer,
            "valid": valid,
        })
    df = pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))
    df["sample_index"] = df["sample_index"].astype("int64")
    df["seed"] = df["seed"].astype("int64")
    df["valid"] = df["valid"].astype(bool)
    df["answer"] = df["answer"].astype(object)
    return df


def content_hash(train: pd.DataFrame) -> str:
    """sha256 (hex) of the canonical rows: canonical order, compact sorted-key JSON per row, newline-joined."""
    h = hashlib.sha256()
    ordered = train.sort_values(_CANONICAL_ORDER, kind="stable")
    for rec in ordered[list(TRAIN_COLUMNS)].to_dict(orient="records"):
        clean = {k: (None if (v is None or (isinstance(v, float) and pd.isna(v))) else
                     int(v) if k in ("sample_index", "seed") else bool(v) if k == "valid" else str(v))
                 for k, v in rec.items()}
        h.update(json.dumps(clean, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def read_training_set(path: str | Path) -> list[dict]:
    """The training set as a list of {messages: [...prompt...], target: str} (what the trainer needs).

    `path` is a `train.parquet` or the folder holding one. Uses pyarrow only (no pandas needed)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        p = p / TRAIN_PARQUET
    if not p.is_file():
        raise DatasetError(f"training set not found: {p}")
    table = pq.read_table(p, columns=["example_id", "messages", "target"])
    out = []
    for ex_id, msgs, target in zip(*(table.column(c).to_pylist() for c in ("example_id", "messages", "target"))):
        out.append({"example_id": ex_id, "messages": json.loads(msgs), "target": target})
    if not out:
        raise DatasetError(f"training set is empty: {p}")
    return out


# ----------------------------------------------------------------------------------------- exports
def to_alpaca(train: pd.DataFrame) -> list[dict]:
    return [
        {"instruction": r.user, "input": "", "output": r.target, "system": r.system}
        for r in train.itertuples(index=False)
    ]


def to_sharegpt(train: pd.DataFrame) -> list[dict]:
    return [
        {
            "conversations": [{"from": "human", "value": r.user}, {"from": "gpt", "value": r.target}],
            "system": r.system,
        }
        for r in train.itertuples(index=False)
    ]


def dataset_info_entries(name: str) -> dict:
    """LLaMA-Factory `dataset_info.json` entries for both exports (`<name>_alpaca`, `<name>_sharegpt`)."""
    return {
        f"{name}_alpaca": {
            "file_name": ALPACA_JSON,
            "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
        },
        f"{name}_sharegpt": {
            "file_name": SHAREGPT_JSON,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        },
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def scenario_stats(samples: pd.DataFrame, train: pd.DataFrame) -> list[dict]:
    """Per scenario: samples, valid, invalid rate, C-rate among valid C/D answers (2x2 games), mean PGG
    contribution among valid answers, and training examples kept."""
    kept = train.groupby("scenario_id").size().to_dict() if len(train) else {}
    out = []
    for sid, g in samples.groupby("scenario_id", sort=True):
        n = len(g)
        valid = g[g["valid"].astype(bool)]
        answers = [str(a) for a in valid["answer"] if a is not None and not (isinstance(a, float) and pd.isna(a))]
        letters = [a for a in answers if a in ("C", "D")]
        numbers = [float(a) for a in answers if a not in ("C", "D") and _is_number(a)]  # PGG: 7, 7.5
        out.append({
            "scenario_id": str(sid),
            "family": str(g["family"].iloc[0]),
            "context": str(g["context"].iloc[0]),
            "game": str(g["game"].iloc[0]),
            "samples": int(n),
            "valid": int(len(valid)),
            "invalid_rate": float((n - len(valid)) / n) if n else 0.0,
            "c_rate": float(letters.count("C") / len(letters)) if letters else None,
            "mean_contribution": float(sum(numbers) / len(numbers)) if numbers and not letters else None,
            "examples": int(kept.get(sid, 0)),
        })
    return out


@dataclass
class DatasetExport:
    """What `export_training_set` wrote, and the card's numbers."""

    name: str
    out_dir: Path
    parquet: Path
    alpaca: Path
    sharegpt: Path
    dataset_info: Path
    card: Path
    meta: Path
    content_hash: str
    targets: str
    valid_policy: str
    teachers: list[str]
    run_ids: list[str]
    samples: int
    examples: int
    invalid: int
    dropped: int
    scenarios: list[dict] = field(default_factory=list)
    placebo: dict | None = None  # a placebo set: seed, source content hash, examples moved (`export_placebo_set`)

    @property
    def mlflow_digest(self) -> str:
        return self.content_hash[:MLFLOW_DIGEST_LEN]

    @classmethod
    def from_dir(cls, out_dir: str | Path) -> "DatasetExport":
        """An export written earlier (reads its `dataset_meta.json`)."""
        meta_path = Path(out_dir) / META_JSON
        if not meta_path.is_file():
            raise DatasetError(f"no {META_JSON} in {out_dir}: not a training-set export")
        d = json.loads(meta_path.read_text())
        paths = {"out_dir", "parquet", "alpaca", "sharegpt", "dataset_info", "card", "meta"}
        return cls(**{k: (Path(v) if k in paths else v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_card(ex: DatasetExport) -> str:
    target_text = {
        "answer_motivation": "answer + motivation (the teacher's response text exactly as generated)",
        "answer": "answer only (the parsed answer, e.g. `C`; the motivation ablation)",
    }[ex.targets]
    policy_text = {
        "valid_only": "valid only (samples whose answer parsed)",
        "all": "all samples with a non-empty response (invalid ones included)",
    }[ex.valid_policy]
    lines = [
        f"# Dataset card: `{ex.name}`",
        "",
        "Supervised fine-tuning set distilled from a teacher LLM's answers to game-theoretic scenarios",
        "(tomtransfer; arXiv 2408.05241). Prompt = the scenario's chat (system + user); target = below.",
        "",
    ]
    pl = ex.placebo
    if pl:
        lines += [
            f"**Placebo control.** The training set `{pl['source_content_sha256']}` with its targets permuted across "
            f"scenarios (seed {pl['seed']}, the config's sampling.seed): prompts kept, {pl['moved']} of "
            f"{pl['examples']} completions moved to another scenario's prompt ({pl['stayed']} could not be), 2x2 "
            f"and public-goods completions among their own kind. Same completions, same format, same overall C share "
            f"({_pct(pl['c_share'])}); no scenario -> choice mapping. Per scenario below, the C-rate is that of the "
            f"completions now at its prompts.",
            "",
        ]
    lines += [
        f"- **Teacher:** {', '.join(f'`{t}`' for t in ex.teachers)}",
        f"- **Generation run(s):** {', '.join(f'`{r}`' for r in ex.run_ids)}",
        f"- **Targets:** {target_text}",
        f"- **Sample policy:** {policy_text}",
        f"- **Counts:** {ex.samples} samples read, {ex.invalid} invalid, {ex.examples} training examples, "
        f"{ex.dropped} samples dropped",
        f"- **Scenarios:** {len(ex.scenarios)} ({', '.join(sorted({s['family'] for s in ex.scenarios}))})",
        f"- **Content hash (sha256 of the canonical rows):** `{ex.content_hash}`",
        f"- **MLflow dataset digest:** `{ex.mlflow_digest}`",
        "",
        "## Files",
        "",
        f"| file | format |",
        f"| --- | --- |",
        f"| `{TRAIN_PARQUET}` | Parquet, one row an example (`{', '.join(TRAIN_COLUMNS)}`) |",
        f"| `{ALPACA_JSON}` | LLaMA-Factory alpaca (`system`, `instruction`, `input`, `output`) |",
        f"| `{SHAREGPT_JSON}` | LLaMA-Factory sharegpt (`system`, `conversations` of `from`/`value`) |",
        f"| `{DATASET_INFO_JSON}` | LLaMA-Factory registry: `{ex.name}_alpaca`, `{ex.name}_sharegpt` |",
        "",
        "## Per scenario",
        "",
        "C-rate: share of `C` among the teacher's valid C/D answers (all valid samples, before any policy).",
        "Invalid rate: share of samples whose answer did not parse. PGG rows show the mean contribution.",
        "",
        "| scenario | family | context | game | samples | valid | invalid rate | C-rate | mean contribution | examples |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in ex.scenarios:
        mc = "-" if s["mean_contribution"] is None else f"{s['mean_contribution']:.2f}"
        lines.append(
            f"| `{s['scenario_id']}` | {s['family']} | {s['context']} | {s['game']} | {s['samples']} | {s['valid']} "
            f"| {_pct(s['invalid_rate'])} | {_pct(s['c_rate'])} | {mc} | {s['examples']} |"
        )
    tot_valid = sum(s["valid"] for s in ex.scenarios)
    lines += [
        f"| **total** | | | | {ex.samples} | {tot_valid} | {_pct((ex.samples - tot_valid) / ex.samples if ex.samples else 0)} "
        f"| | | {ex.examples} |",
        "",
    ]
    return "\n".join(lines)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def export_training_set(
    samples: pd.DataFrame | str | Path | Iterable[str | Path],
    out_dir: str | Path,
    *,
    name: str = "tomtransfer",
    targets: Targets = "answer_motivation",
    valid_policy: ValidPolicy = "valid_only",
    teacher: str | None = None,
) -> DatasetExport:
    """Build the training set from samples (a DataFrame, or Parquet paths) and write every export.

    `teacher` names the weights behind the served model name in the samples (e.g. `qwen2.5-coder-0.5b-instruct
    (transformers)` for `teacher`), for the card; default: the served names."""
    if not isinstance(samples, pd.DataFrame):
        samples = load_samples(samples)
    train = build_training_set(samples, targets=targets, valid_policy=valid_policy)
    if train.empty:
        raise DatasetError(
            f"no training examples left from {len(samples)} samples (targets={targets}, policy={valid_policy})"
        )
    out = Path(out_dir)
    ex = _export(train, out, name=name, content=content_hash(train), targets=targets, valid_policy=valid_policy,
                 teachers=[teacher] if teacher else sorted(str(m) for m in samples["model"].unique()),
                 run_ids=sorted(str(r) for r in samples["run_id"].unique()), samples=int(len(samples)),
                 invalid=int((~samples["valid"].astype(bool)).sum()), scenarios=scenario_stats(samples, train))
    return ex


def _export(train: pd.DataFrame, out: Path, *, name: str, content: str, targets: str, valid_policy: str,
            teachers: list[str], run_ids: list[str], samples: int, invalid: int, scenarios: list[dict],
            placebo: dict | None = None) -> DatasetExport:
    """Write the training set, its exports, card and meta into `out` (the Parquet file atomically, last the meta)."""
    out.mkdir(parents=True, exist_ok=True)
    ex = DatasetExport(
        name=name,
        out_dir=out,
        parquet=out / TRAIN_PARQUET,
        alpaca=out / ALPACA_JSON,
        sharegpt=out / SHAREGPT_JSON,
        dataset_info=out / DATASET_INFO_JSON,
        card=out / CARD_MD,
        meta=out / META_JSON,
        content_hash=content,
        targets=targets,
        valid_policy=valid_policy,
        teachers=teachers,
        run_ids=run_ids,
        samples=samples,
        examples=int(len(train)),
        invalid=invalid,
        dropped=int(samples - len(train)),
        scenarios=scenarios,
        placebo=placebo,
    )
    tmp = ex.parquet.with_suffix(".parquet.tmp")
    train.to_parquet(tmp, index=False)
    tmp.replace(ex.parquet)
    _write_json(ex.alpaca, to_alpaca(train))
    _write_json(ex.sharegpt, to_sharegpt(train))
    _write_json(ex.dataset_info, dataset_info_entries(name))
    ex.card.write_text(render_card(ex), encoding="utf-8")
    _write_json(ex.meta, ex.to_json())
    return ex


# ------------------------------------------------------------------------------------------- placebo
PLACEBO_COLUMNS = ("source_example_id", "source_scenario_id")  # where each completion of a placebo set came from
_MOVED = ("target", "answer", "valid")  # what travels with a completion


def _kind(family: str, game: str) -> str:
    return "pgg" if family == "pgg" or game == "pgg" else "2x2"


def scenario_derangement(labels, rng) -> "list[int]":
    """src[i]: the position whose completion goes to position i. A uniformly random permutation, then each position
    left with a completion of its own scenario swaps with a random partner where both end up with another scenario's
    completion (such a swap never undoes an earlier one); a position stays only where no partner exists (one
    scenario holding more than half of the examples)."""
    import numpy as np

    labels = np.asarray(labels)
    src = rng.permutation(len(labels))
    for i in range(len(labels)):
        if labels[src[i]] != labels[i]:
            continue
        ok = np.flatnonzero((labels[src] != labels[i]) & (labels != labels[src[i]]))
        if len(ok):
            j = int(ok[rng.integers(len(ok))])
            src[i], src[j] = src[j], src[i]
    return src.tolist()


def placebo_training_set(train: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, dict]:
    """The placebo set of `train` (see the module docstring) and its numbers (seed, moved, stayed, C share)."""
    import numpy as np

    rng = np.random.default_rng(int(seed))
    train = train.sort_values(_CANONICAL_ORDER, kind="stable").reset_index(drop=True)
    kinds = np.array([_kind(str(f), str(g)) for f, g in zip(train["family"], train["game"])])
    src = np.arange(len(train))
    for kind in sorted(set(kinds)):
        idx = np.flatnonzero(kinds == kind)
        src[idx] = idx[scenario_derangement(train["scenario_id"].to_numpy()[idx], rng)]
    out = train.copy()
    for col in _MOVED:
        out[col] = train[col].to_numpy()[src]
    out["source_example_id"] = train["example_id"].to_numpy()[src]
    out["source_scenario_id"] = train["scenario_id"].to_numpy()[src]
    out["answer"] = out["answer"].astype(object)
    out["valid"] = out["valid"].astype(bool)
    moved = int((out["source_scenario_id"] != out["scenario_id"]).sum())
    letters = [a for a in train["answer"] if a in ("C", "D")]
    info = {"seed": int(seed), "examples": int(len(out)), "moved": moved, "stayed": int(len(out) - moved),
            "c_share": (letters.count("C") / len(letters)) if letters else None}
    return out, info


def export_placebo_set(source: str | Path, out_dir: str | Path, *, seed: int, name: str = "tomtransfer",
                       targets: str = "answer_motivation", valid_policy: str = "valid_only") -> DatasetExport:
    """Write the placebo set of the training set `source` (a train.parquet or its folder) into `out_dir`, as a
    training set with its exports and card (named `<name>-placebo`). `targets` / `valid_policy`: the source's, for
    the card (read from the source's `dataset_meta.json` when it has one)."""
    src = Path(source)
    src = src / TRAIN_PARQUET if src.is_dir() else src
    if not src.is_file():
        raise DatasetError(f"training set not found: {src}")
    train = pd.read_parquet(src)
    missing = [c for c in TRAIN_COLUMNS if c not in train.columns]
    if missing:
        raise DatasetError(f"{src}: not a training set (lacks {', '.join(missing)})")
    train = train[list(TRAIN_COLUMNS)]
    if train.empty:
        raise DatasetError(f"training set is empty: {src}")
    meta = src.parent / META_JSON
    if meta.is_file():
        d = json.loads(meta.read_text())
        targets, valid_policy = d.get("targets", targets), d.get("valid_policy", valid_policy)
    placebo, info = placebo_training_set(train, seed)
    info["source_content_sha256"] = content_hash(train)
    info["source"] = str(src)
    as_samples = placebo.rename(columns={"teacher": "model"})
    return _export(placebo, Path(out_dir), name=f"{name}-placebo", content=content_hash(placebo), targets=targets,
                   valid_policy=valid_policy, teachers=sorted(str(t) for t in train["teacher"].unique()),
                   run_ids=sorted(str(r) for r in train["run_id"].unique()), samples=int(len(train)),
                   invalid=int((~train["valid"].astype(bool)).sum()),
                   scenarios=scenario_stats(as_samples, placebo), placebo=info)


# ------------------------------------------------------------------------------------------- MLflow
def log_dataset_to_mlflow(
    ex: DatasetExport,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    context: str = "training",
    artifact_path: str = "dataset",
) -> str:
    """Log the training set as an MLflow dataset input (name, digest, schema) plus card and exports as
    artifacts under `artifact_path/`. Uses the active run when `run_id` is None (starting one if there is
    none, like `mlflow.log_input`); with `run_id`, logs to that run through a client and leaves the
    active-run state alone. Returns the run id."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    df = pd.read_parquet(ex.parquet)
    tags = {
        "content_sha256": ex.content_hash,
        "targets": ex.targets,
        "valid_policy": ex.valid_policy,
        "teacher": ",".join(ex.teachers),
        "examples": str(ex.examples),
    }
    if ex.placebo:
        tags |= {"placebo": "true", "placebo_seed": str(ex.placebo["seed"]),
                 "placebo_source_sha256": str(ex.placebo["source_content_sha256"]),
                 "placebo_moved": str(ex.placebo["moved"])}
    client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
    # mlflow warns that the source "can be interpreted in multiple ways" and that the inferred schema has integer
    # columns: both are noise for a training set with no missing values.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            df, source=str(ex.parquet.resolve()), targets="target", name=ex.name, digest=ex.mlflow_digest
        )
        active = mlflow.active_run()
        if run_id is None or (active is not None and active.info.run_id == run_id):
            mlflow.log_input(dataset, context=context, tags=tags)
            run_id = mlflow.active_run().info.run_id
        else:
            entity = DatasetInput(
                dataset=dataset._to_mlflow_entity(),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)] + [InputTag(k, v) for k, v in tags.items()],
            )
            client.log_inputs(run_id, datasets=[entity])
    for path in (ex.card, ex.meta, ex.parquet, ex.alpaca, ex.sharegpt, ex.dataset_info):
        client.log_artifact(run_id, str(path), artifact_path)
    return run_id

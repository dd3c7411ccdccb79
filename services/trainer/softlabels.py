"""The soft-label set: the teacher's per-scenario choice distribution among valid answers, the target of
`training.objective: distribution` (and `sft+distribution`).

One row a scenario (`SOFT_COLUMNS`):

  scenario_id, family, context, game
  instruction          the instruction of the student's prompt the loss is computed under (the one it is evaluated
                       with: answer_only under the paper's protocol)
  teacher_instruction  the instruction the teacher answered under (its own: generate.instruction)
  messages             JSON chat list, the student's prompt (system + user) under `instruction`
  actions              JSON list of the action strings: ["C", "D"] for a 2x2 game, ["0", ..., "<endowment>"] for
                       the public-goods game
  probs                JSON list, the teacher's P(action | valid answer), same order, sums to 1
  source               exact (the whole valid mass leads with an answer, or no sample said otherwise), mixture
                       (exact leading mass + samples for the rest) or samples (no exact row: counts of parsed answers)
  n_samples            the teacher's samples of the scenario (all of them, valid or not)
  n_tail               of those, the samples whose response does not lead with an answer (the mixture's remainder)
  lead_mass            the exact leading-answer mass (P(the response starts with a valid answer)); null: no exact row
  valid_mass           P(a valid answer) of the combined estimate

How a row is computed (2x2): exact mode gives p_C, p_D, the probabilities that the teacher's response *leads* with
C / D; its samples that do not lead with a letter estimate how the remaining mass answers. `shared.transfer.Choice
.mixture` combines them: P(C) = P(leading C) + P(no leading letter) x P(C | no leading letter); the row is
(P(C), P(D)) / (P(C) + P(D)). Public-goods game: the same formula per whole amount a in 0..endowment, P(a) = P(leading
a) + P(no leading whole amount) x share of the remainder's samples whose parsed amount rounds to a (halves up: the
paper's PGG is continuous, the soft labels are over the whole amounts exact mode reads). Without an exact row the
counts of all samples' parsed answers are used (source samples). A scenario with no valid answer at all has no
target and is left out (the card counts it).

Files (`export_soft_labels`): `soft_labels.parquet`, `SOFT_LABELS_CARD.md`, `soft_labels_meta.json` (written last:
a folder with a meta is complete). Versioned twice: `FORMAT_VERSION` (the columns' meaning) and the content hash
(sha256 of the canonical rows, sorted by scenario, compact sorted-key JSON; the MLflow dataset digest is its first 32
hex digits). The pipeline's train stage writes a set once under a folder named by its inputs (the key holds
`FORMAT_VERSION`).

No torch, ray or mlflow at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from tomtransfer.shared.errors import UserError

from tomtransfer.services.trainer.dataset import scenario_derangement

# The training loop reads this module (`read_soft_labels`) where pydantic, scipy and the serving code are missing:
# shared.samples / shared.prompts (pydantic), shared.transfer (scipy) and services.teacher.exact (torch's serving
# side) are imported where they are used.

FORMAT_VERSION = 1
SOFT_PARQUET = "soft_labels.parquet"
SOFT_CARD_MD = "SOFT_LABELS_CARD.md"
SOFT_META_JSON = "soft_labels_meta.json"
MLFLOW_DIGEST_LEN = 32
SOFT_COLUMNS: tuple[str, ...] = (
    "scenario_id", "family", "context", "game", "instruction", "teacher_instruction", "messages", "actions", "probs",
    "source", "n_samples", "n_tail", "lead_mass", "valid_mass",
)
_PROB_TOL = 1e-6


class SoftLabelError(UserError):
    """A soft-label set that cannot be built or read (no rows, bad probabilities, missing columns)."""


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def actions_for(scenario) -> list[str]:
    """The action strings of a scenario: C/D, or the whole amounts 0..endowment of the public-goods game."""
    if scenario.is_pgg:
        return [str(a) for a in range(int(scenario.game.endowment) + 1)]
    return ["C", "D"]


def _whole_amount(answer, endowment: int) -> int | None:
    try:
        x = float(str(answer))
    except ValueError:
        return None
    if not 0 <= x <= endowment:
        return None
    return int(math.floor(x + 0.5))


def scenario_distribution(scenario, samples: pd.DataFrame, exact_row: dict | None) -> dict:
    """The teacher's distribution over `actions_for(scenario)` among valid answers on one scenario, from its samples
    (columns response, answer, valid) and its exact leading-answer row (p_C / p_D, or pgg_dist), either may be
    missing. Returns {actions, probs (None: no valid answer), source, n_samples, n_tail, lead_mass, valid_mass}."""
    from tomtransfer.services.teacher.exact import lead_choice, lead_contribution
    from tomtransfer.shared.transfer import Choice

    actions = actions_for(scenario)
    responses = samples["response"].tolist() if len(samples) else []
    answers = samples["answer"].tolist() if len(samples) else []
    valids = [bool(v) for v in samples["valid"].tolist()] if len(samples) else []
    n = len(responses)
    if scenario.is_pgg:
        endowment = int(scenario.game.endowment)

        def leads(text) -> bool:
            return isinstance(text, str) and lead_contribution(text, endowment) is not None

        def tally(idx) -> tuple[list[float], int]:
            counts = [0.0] * len(actions)
            for i in idx:
                a = _whole_amount(answers[i], endowment) if valids[i] and not _missing(answers[i]) else None
                if a is not None:
                    counts[a] += 1
            return counts, len(idx)
    else:
        def leads(text) -> bool:
            return isinstance(text, str) and lead_choice(text) is not None

        def tally(idx) -> tuple[list[float], int]:
            chosen = [str(answers[i]).strip().upper() for i in idx if valids[i] and not _missing(answers[i])]
            return [float(chosen.count("C")), float(chosen.count("D"))], len(idx)

    if exact_row is None:
        counts, total = tally(range(n))
        mass = [c / total for c in counts] if total else [0.0] * len(actions)
        source, n_tail, lead_mass = "samples", n, None
    else:
        tail_idx = [i for i in range(n) if not leads(responses[i])]
        counts, n_tail = tally(tail_idx)
        if scenario.is_pgg:
            lead = [float(x) for x in json.loads(exact_row["pgg_dist"])]
            if len(lead) != len(actions):
                raise SoftLabelError(f"{scenario.id}: the exact row's distribution has {len(lead)} amounts, the game "
                                     f"{len(actions)}")
            lead_mass = sum(lead)
            rest = max(1.0 - lead_mass, 0.0)
            mass = [lead[a] + (rest * counts[a] / n_tail if n_tail else 0.0) for a in range(len(actions))]
        else:  # the evaluator's own combination (shared.transfer), so the target is the teacher it reports
            choice = Choice.mixture(float(exact_row["p_C"]), float(exact_row["p_D"]), int(counts[0]), int(counts[1]),
                                    n_tail - int(counts[0]) - int(counts[1]))
            mass = list(choice.probs())
            lead_mass = float(exact_row["p_C"]) + float(exact_row["p_D"])
            rest = max(1.0 - lead_mass, 0.0)
        source = "mixture" if n_tail and rest > _PROB_TOL else "exact"
    valid_mass = float(sum(mass))
    probs = [float(m / valid_mass) for m in mass] if valid_mass > 0 else None
    return {"actions": actions, "probs": probs, "source": source, "n_samples": int(n), "n_tail": int(n_tail),
            "lead_mass": None if lead_mass is None else float(lead_mass), "valid_mass": valid_mass}


def build_soft_labels(scenarios: list, samples: pd.DataFrame | None, exact_rows: dict[str, dict] | None, *,
                      instruction: str, teacher_instruction: str) -> tuple[pd.DataFrame, list[str]]:
    """The soft-label set (`SOFT_COLUMNS`, sorted by scenario) of `scenarios` from the teacher's samples (columns
    scenario_id, response, answer, valid; any role filtering done by the caller) and exact leading-answer rows
    (scenario_id -> row). Returns the rows and the ids of scenarios left out for want of a valid answer."""
    from tomtransfer.shared.prompts import build_messages

    rows, dropped = [], []
    empty = pd.DataFrame({"scenario_id": [], "response": [], "answer": [], "valid": []})
    by_sid = dict(tuple(samples.groupby("scenario_id", sort=False))) if samples is not None and len(samples) else {}
    for s in sorted(scenarios, key=lambda s: s.id):
        got = by_sid.get(s.id, empty)
        d = scenario_distribution(s, got, (exact_rows or {}).get(s.id))
        if d["probs"] is None:
            dropped.append(s.id)
            continue
        rows.append({
            "scenario_id": s.id, "family": s.family, "context": s.context.id, "game": s.game_id,
            "instruction": instruction, "teacher_instruction": teacher_instruction,
            "messages": json.dumps(build_messages(s, instruction), ensure_ascii=False),  # type: ignore[arg-type]
            "actions": json.dumps(d["actions"]), "probs": json.dumps(d["probs"]), "source": d["source"],
            "n_samples": d["n_samples"], "n_tail": d["n_tail"], "lead_mass": d["lead_mass"],
            "valid_mass": d["valid_mass"],
        })
    df = pd.DataFrame(rows, columns=list(SOFT_COLUMNS))
    for col in ("n_samples", "n_tail"):
        df[col] = df[col].astype("int64")
    return df, dropped


def validate_soft_labels(df: pd.DataFrame, where: str) -> None:
    """Columns present, at least one row, one row per scenario, actions and probs of equal length, probs >= 0
    summing to 1. Raises SoftLabelError naming the first fault."""
    missing = [c for c in ("scenario_id", "messages", "actions", "probs") if c not in df.columns]
    if missing:
        raise SoftLabelError(f"{where}: not a soft-label set (lacks {', '.join(missing)})")
    if df.empty:
        raise SoftLabelError(f"{where}: the soft-label set is empty (no scenario has a target)")
    dup = df["scenario_id"].duplicated()
    if dup.any():
        raise SoftLabelError(f"{where}: scenario {df['scenario_id'][dup].iloc[0]} appears twice")
    for r in df.itertuples(index=False):
        try:
            actions, probs, msgs = json.loads(r.actions), json.loads(r.probs), json.loads(r.messages)
        except (TypeError, json.JSONDecodeError):
            raise SoftLabelError(f"{where}: {r.scenario_id}: actions/probs/messages are not JSON") from None
        if not isinstance(msgs, list) or not msgs:
            raise SoftLabelError(f"{where}: {r.scenario_id}: messages is not a chat list")
        if not isinstance(actions, list) or len(actions) < 2 or not all(isinstance(a, str) for a in actions):
            raise SoftLabelError(f"{where}: {r.scenario_id}: actions must be a list of >= 2 strings")
        if len(set(actions)) != len(actions):
            raise SoftLabelError(f"{where}: {r.scenario_id}: an action appears twice")
        if not isinstance(probs, list) or len(probs) != len(actions):
            raise SoftLabelError(f"{where}: {r.scenario_id}: {len(actions)} actions but probs of another length")
        if any((not isinstance(p, (int, float))) or p < 0 or math.isnan(p) for p in probs) or \
                abs(sum(probs) - 1.0) > 1e-4:
            raise SoftLabelError(f"{where}: {r.scenario_id}: probs must be >= 0 and sum to 1, got {probs}")


def content_hash(df: pd.DataFrame) -> str:
    """sha256 of the canonical rows: sorted by scenario, compact sorted-key JSON per row, newline-joined."""
    h = hashlib.sha256()
    cols = [c for c in SOFT_COLUMNS if c in df.columns]
    for rec in df.sort_values("scenario_id", kind="stable")[cols].to_dict(orient="records"):
        clean = {k: (None if _missing(v) else int(v) if k in ("n_samples", "n_tail") else
                     float(v) if k in ("lead_mass", "valid_mass") else str(v)) for k, v in rec.items()}
        h.update(json.dumps(clean, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def read_soft_labels(path: str | Path) -> list[dict]:
    """The set as [{scenario_id, messages (list), actions (list), probs (list)}] (what the trainer needs); `path`: a
    soft_labels.parquet or its folder. Validates (`validate_soft_labels`)."""
    p = Path(path)
    if p.is_dir():
        p = p / SOFT_PARQUET
    if not p.is_file():
        raise SoftLabelError(f"soft-label set not found: {p}")
    try:
        df = pd.read_parquet(p)
    except Exception as err:  # noqa: BLE001 - a file that is not Parquet
        raise SoftLabelError(f"{p}: not a Parquet file ({type(err).__name__})") from None
    validate_soft_labels(df, str(p))
    return [{"scenario_id": str(r.scenario_id), "messages": json.loads(r.messages), "actions": json.loads(r.actions),
             "probs": [float(x) for x in json.loads(r.probs)]} for r in df.itertuples(index=False)]


# ------------------------------------------------------------------------------------------------- export
@dataclass
class SoftLabelExport:
    name: str
    out_dir: Path
    parquet: Path
    card: Path
    meta: Path
    content_hash: str
    format_version: int
    teacher: str
    instruction: str
    teacher_instruction: str
    rows: int
    dropped: list[str] = field(default_factory=list)
    sources: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # what it was built from (samples file, exact store, key)

    @property
    def mlflow_digest(self) -> str:
        return self.content_hash[:MLFLOW_DIGEST_LEN]

    @classmethod
    def from_dir(cls, out_dir: str | Path) -> "SoftLabelExport":
        meta = Path(out_dir) / SOFT_META_JSON
        if not meta.is_file():
            raise SoftLabelError(f"no {SOFT_META_JSON} in {out_dir}: not a soft-label set export")
        d = json.loads(meta.read_text())
        paths = {"out_dir", "parquet", "card", "meta"}
        return cls(**{k: (Path(v) if k in paths else v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def render_card(ex: SoftLabelExport, df: pd.DataFrame) -> str:
    src = ", ".join(f"{k} {v}" for k, v in sorted(ex.sources.items()))
    lines = [
        f"# Soft-label set: `{ex.name}`",
        "",
        "The teacher's per-scenario choice distribution among valid answers (tomtransfer; the target of "
        "`training.objective: distribution`). Not in the paper (arXiv 2408.05241), which fine-tunes on sampled text.",
        "",
        f"- **Teacher:** `{ex.teacher}`, answering under `{ex.teacher_instruction}`",
        f"- **Student prompt (the loss's instruction):** `{ex.instruction}`",
        "- **How:** exact mode's leading-answer mass, plus the teacher's samples that do not lead with an answer for "
        "the rest (P(a) = P(leading a) + P(no leading answer) x P(a | no leading answer)); samples only where no "
        "exact row exists; normalised over the valid answers",
        f"- **Rows:** {ex.rows} scenarios ({src}); left out for want of a valid answer: "
        f"{', '.join(ex.dropped) if ex.dropped else 'none'}",
        f"- **Format version:** {ex.format_version}",
        f"- **Content hash (sha256 of the canonical rows):** `{ex.content_hash}`",
        f"- **MLflow dataset digest:** `{ex.mlflow_digest}`",
        "",
        "| scenario | family | game | source | samples | tail | lead mass | valid mass | distribution |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in df.itertuples(index=False):
        acts, probs = json.loads(r.actions), json.loads(r.probs)
        dist = " ".join(f"{a}:{p:.3f}" for a, p in zip(acts, probs))
        lead = "-" if _missing(r.lead_mass) else f"{r.lead_mass:.3f}"
        lines.append(f"| `{r.scenario_id}` | {r.family} | {r.game} | {r.source} | {r.n_samples} | {r.n_tail} | "
                     f"{lead} | {r.valid_mass:.3f} | {dist} |")
    return "\n".join(lines) + "\n"


def export_soft_labels(df: pd.DataFrame, out_dir: str | Path, *, name: str, teacher: str, instruction: str,
                       teacher_instruction: str, dropped: list[str] | None = None,
                       inputs: dict | None = None) -> SoftLabelExport:
    """Validate and write the set, its card and meta into `out_dir` (Parquet atomically, the meta last). An empty set
    raises SoftLabelError before anything is written."""
    validate_soft_labels(df, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = df.sort_values("scenario_id", kind="stable").reset_index(drop=True)
    ex = SoftLabelExport(name=name, out_dir=out, parquet=out / SOFT_PARQUET, card=out / SOFT_CARD_MD,
                         meta=out / SOFT_META_JSON, content_hash=content_hash(df), format_version=FORMAT_VERSION,
                         teacher=teacher, instruction=instruction, teacher_instruction=teacher_instruction,
                         rows=int(len(df)), dropped=list(dropped or []),
                         sources={str(k): int(v) for k, v in df["source"].value_counts().items()},
                         inputs=dict(inputs or {}))
    tmp = ex.parquet.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(ex.parquet)
    ex.card.write_text(render_card(ex, df), encoding="utf-8")
    tmp_meta = ex.meta.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(ex.to_json(), indent=1) + "\n", encoding="utf-8")
    tmp_meta.replace(ex.meta)
    return ex


def placebo_soft_labels(source: str | Path, out_dir: str | Path, *, seed: int, name: str) -> SoftLabelExport:
    """The placebo of a soft-label set: each scenario's target moved to another scenario's prompt (2x2 and
    public-goods targets among their own kind; `services.trainer.dataset.scenario_derangement` seeded with `seed`),
    so the targets' multiset stays and the scenario -> choice mapping goes."""
    import numpy as np

    src = Path(source)
    src = src / SOFT_PARQUET if src.is_dir() else src
    df = pd.read_parquet(src)
    validate_soft_labels(df, str(src))
    df = df.sort_values("scenario_id", kind="stable").reset_index(drop=True)
    kinds = np.array([str(len(json.loads(a))) for a in df["actions"]])  # same action set = same kind of game
    order = np.arange(len(df))
    rng = np.random.default_rng(int(seed))
    for kind in sorted(set(kinds)):
        idx = np.flatnonzero(kinds == kind)
        order[idx] = idx[scenario_derangement(df["scenario_id"].to_numpy()[idx], rng)]
    out = df.copy()
    for col in ("probs", "source", "n_samples", "n_tail", "lead_mass", "valid_mass"):
        out[col] = df[col].to_numpy()[order]
    meta = SoftLabelExport.from_dir(src.parent) if (src.parent / SOFT_META_JSON).is_file() else None
    moved = int((df["scenario_id"].to_numpy()[order] != df["scenario_id"].to_numpy()).sum())
    return export_soft_labels(
        out, out_dir, name=f"{name}-placebo", teacher=meta.teacher if meta else "?",
        instruction=meta.instruction if meta else str(df["instruction"].iloc[0]),
        teacher_instruction=meta.teacher_instruction if meta else str(df["teacher_instruction"].iloc[0]),
        inputs={"placebo_of": content_hash(df), "seed": int(seed), "moved": moved, "rows": int(len(df))})


def log_soft_labels_to_mlflow(ex: SoftLabelExport, *, run_id: str, tracking_uri: str,
                              artifact_path: str = "soft_labels") -> None:
    """The set as an MLflow dataset input of `run_id` (name, digest = the content hash's first 32 hex digits, context
    `distillation`), with its card, meta and Parquet as artifacts."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = MlflowClient(tracking_uri)
    df = pd.read_parquet(ex.parquet)
    tags = {"content_sha256": ex.content_hash, "format_version": str(ex.format_version), "teacher": ex.teacher,
            "instruction": ex.instruction, "teacher_instruction": ex.teacher_instruction, "rows": str(ex.rows),
            "kind": "soft-labels"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.set_tracking_uri(tracking_uri)
        dataset = mlflow.data.from_pandas(df, source=str(ex.parquet.resolve()), name=ex.name, digest=ex.mlflow_digest)
        entity = DatasetInput(dataset=dataset._to_mlflow_entity(),
                              tags=[InputTag(MLFLOW_DATASET_CONTEXT, "distillation")]
                              + [InputTag(k, v) for k, v in tags.items()])
        client.log_inputs(run_id, datasets=[entity])
    for path in (ex.card, ex.meta, ex.parquet):
        client.log_artifact(run_id, str(path), artifact_path)


def samples_frame(paths: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """The generate stage's samples (role teacher) with the columns the soft labels read."""
    from tomtransfer.shared.samples import read_samples

    df = read_samples(paths, required=("scenario_id", "response", "answer", "valid"), error=SoftLabelError)
    if "role" in df.columns:
        df = df[df["role"] == "teacher"]
    return df

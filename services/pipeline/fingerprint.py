"""Stage fingerprints: a stage's outputs live under a folder named by the hash of exactly its inputs.

A rerun with other inputs therefore never finds (and never reports) results made from the old ones, and a rerun
with the same inputs finds them and resumes or reuses them. What each stage's key holds:

  generate           the teacher's weights and serving (`model_identity`), the sampling settings, the generate
                     section, the scenarios it covers (ids and texts of packs)
  train              the training set's content (sha256), the student's weights, the training section minus
                     the knobs that cannot change the adapter (`TRAIN_OPERATIONAL`, `training.placebo` among them:
                     turning the placebo on reuses the real adapter); the objective's knobs only where the
                     objective is not sft (an sft key is unchanged by them), and then also the soft-label set
                     (a given file's sha256, or the built set's inputs key `soft_labels_key`)
  train (placebo)    the same, of the placebo set (the real set's completions permuted with sampling.seed; its
                     content hash holds the permutation), plus a placebo marker
  evaluate (a role)  the role's model identity (for the fine-tuned and placebo students: the adapter's content),
                     its prompt, estimator and sampling settings; each role has its own store, so a new adapter
                     re-measures its own role only; the teacher's leading-answer rows (`evaluate.teacher_lead`)
                     have their own store too
  evaluate (stage)   `evaluate_key`: every store it reads (so the roles, including student_placebo, and the
                     teacher_lead switch) and the evaluate section's metric settings

Weights: an alias of the offline store is its GGUF's sha256; a local folder is the sha256 of its files; a hub id
is the id (a hub revision is not configurable here); a remote (openai engine) model is its URL and name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shared.config import ExperimentConfig, ModelSpec

SHORT = 12  # hex digits in folder names: 48 bits, no collision in any realistic number of runs
# Training knobs that change how the work is scheduled or what the adapter is called, not the weights it holds.
TRAIN_OPERATIONAL = ("max_failures", "checkpoint_every_steps", "cpus_per_worker", "threads_per_worker",
                     "adapter_name", "placebo")


def digest(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys; paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# sha256 per file, remembered for this process by the file's identity on disk (path, inode, size, mtime): a run
# asks for the same weights' identity once per stage and role (13 times in all), and reading 13.5 GB each time
# left the H200s idle ~110 s of a 7B run (benchmarks/RESULTS.md, "The paper's protocol end to end"). A file
# rewritten in place keeping its size and mtime to the nanosecond would keep its old hash (the same rule git's
# index and make use).
_FILE_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def dir_sha256(path: Path) -> str:
    """Content hash of a folder: every file's relative path and sha256, in order."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return digest([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])


def weights_identity(model: str) -> dict:
    from services.common.models import ALIASES

    if model in ALIASES:
        return {"alias": model, "gguf_sha256": ALIASES[model].sha256}
    p = Path(model).expanduser()
    if p.is_dir():
        return {"path": str(p.resolve()), "sha256": dir_sha256(p)}
    return {"hub_id": model}


def model_identity(spec: ModelSpec) -> dict:
    """What a served model's answers depend on: its weights and how they are run."""
    ident = {"engine": spec.engine, "dtype": spec.dtype}
    if spec.engine == "openai":
        return {**ident, "base_url": spec.base_url, "remote_model": spec.remote_model or spec.model}
    return {**ident, "weights": weights_identity(spec.model)}


def generate_key(cfg: ExperimentConfig, scenario_ids: list[str]) -> str:
    packs = [file_sha256(Path(p)) for p in cfg.scenarios.packs if Path(p).is_file()]
    return digest({"teacher": model_identity(cfg.models.teacher), "sampling": cfg.sampling.model_dump(mode="json"),
                   "generate": cfg.generate.model_dump(mode="json", exclude={"concurrency"}),
                   "scenarios": scenario_ids, "packs": packs})[:SHORT]


# The distribution objective's knobs: in the train key only where the objective uses them (an sft run's key is the
# one it had before they existed).
TRAIN_OBJECTIVE = ("objective", "distribution_weight", "soft_labels")


def soft_labels_key(cfg: ExperimentConfig) -> str:
    """The soft-label set built from the teacher (`services.pipeline.stages.soft_label_set`): the generate stage's
    key (the teacher's samples: its weights, sampling, instruction, scenarios), the teacher's weights and exact mode
    at the sampling temperature on its own instruction, the student's evaluation instruction (the prompt the loss
    is computed under) and the set's format version."""
    from services.collector.generate import generate_dir
    from services.trainer.softlabels import FORMAT_VERSION

    return digest({"samples": generate_dir(cfg).name, "teacher": model_identity(cfg.models.teacher),
                   "teacher_instruction": cfg.generate.instruction, "temperature": cfg.sampling.temperature,
                   "instruction": cfg.evaluate.instruction_for("student_finetuned"),
                   "format": FORMAT_VERSION})[:SHORT]


def soft_labels_identity(cfg: ExperimentConfig) -> dict:
    """What the distribution objective's target is: a given set's content, or the built set's inputs key."""
    given = cfg.training.soft_labels
    if given:
        p = Path(given)
        p = p / "soft_labels.parquet" if p.is_dir() else p
        return {"file_sha256": file_sha256(p)} if p.is_file() else {"path": str(p)}
    return {"key": soft_labels_key(cfg)}


def train_key(cfg: ExperimentConfig, dataset: Path, *, placebo: bool = False) -> str:
    """`placebo`: the key of the placebo adapter (`dataset` is then the placebo set)."""
    t = cfg.training
    ident = {"dataset": file_sha256(dataset), "student": model_identity(cfg.models.student),
             "training": t.model_dump(mode="json", exclude=set(TRAIN_OPERATIONAL) | set(TRAIN_OBJECTIVE))}
    if t.objective != "sft":
        ident["objective"] = {"objective": t.objective, "soft_labels": soft_labels_identity(cfg),
                              "distribution_weight": t.distribution_weight if t.objective == "sft+distribution"
                              else None}
    return digest({**ident, "placebo": True} if placebo else ident)[:SHORT]


def role_key(identity: dict) -> str:
    return digest(identity)[:SHORT]


# Evaluate settings that change how the work is scheduled or shown, not the numbers.
EVALUATE_OPERATIONAL = ("concurrency", "role_order")


def evaluate_key(cfg: ExperimentConfig, adapters: dict | None = None) -> str:
    """The evaluate stage's inputs: every store it reads (`services.evaluator.collect.store_dirs`: one per role
    and the teacher's leading-answer store; their names are their own keys) and the metric settings."""
    from services.evaluator.collect import store_dirs

    stores = {unit: d.parent.name for unit, d in store_dirs(cfg, adapters).items()}
    dataset = None
    if cfg.teacher_from_dataset:  # the teacher's reference in-sample: the generate stage's samples
        from services.collector.generate import generate_dir

        dataset = generate_dir(cfg).name
    return digest({"stores": stores, "teacher_dataset": dataset,
                   "evaluate": cfg.evaluate.model_dump(mode="json", exclude=set(EVALUATE_OPERATIONAL))})[:SHORT]

"""Content hashes and the key functions of config sections: what names a stage's output folder.

Pure hashing, no stage logic: each key is the sha256 of canonical JSON of exactly the config sections (and file
contents) an output depends on, cut to `SHORT` hex digits. The services below the pipeline name their folders
with these (`collector.generate.generate_dir`, `trainer.train.train_dir`, `evaluator.collect.role_dir`); the
pipeline composes from them the keys that span services (the soft-label set built from the teacher, the evaluate
stage) and lists what each stage's key holds.

Weights: an alias of the offline store is its GGUF's sha256; a local folder is the sha256 of its files; a hub id
is the id (a hub revision is not configurable here); a remote (openai engine) model is its URL and name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tomtransfer.shared.config import ExperimentConfig, ModelSpec

from tomtransfer.services.common.models import ALIASES

SHORT = 12  # hex digits in folder names: 48 bits, no collision in any realistic number of runs
# Training knobs that change how the work is scheduled or what the adapter is called, not the weights it holds.
TRAIN_OPERATIONAL = ("max_failures", "checkpoint_every_steps", "cpus_per_worker", "threads_per_worker",
                     "adapter_name", "placebo")
# The distribution objective's knobs: in the train key only where the objective uses them (an sft run's key is the
# one it had before they existed).
TRAIN_OBJECTIVE = ("objective", "distribution_weight", "soft_labels")
# The base weights' dtype: in the train key only where it differs from what `auto` picks on the same device (a run's
# key is the one it had before the knob existed).
TRAIN_DTYPE = ("dtype",)
# Evaluate settings that change how the work is scheduled or shown, not the numbers.
EVALUATE_OPERATIONAL = ("concurrency", "role_order")


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
    """The teacher's weights and serving, the sampling settings, the generate section (less its concurrency), the
    scenarios covered (`scenario_ids`) and the content of the scenario packs."""
    packs = [file_sha256(Path(p)) for p in cfg.scenarios.packs if Path(p).is_file()]
    return digest({"teacher": model_identity(cfg.models.teacher), "sampling": cfg.sampling.model_dump(mode="json"),
                   "generate": cfg.generate.model_dump(mode="json", exclude={"concurrency"}),
                   "scenarios": scenario_ids, "packs": packs})[:SHORT]


def soft_labels_identity(cfg: ExperimentConfig, built_key: str | None = None) -> dict:
    """What the distribution objective's target is: the set `training.soft_labels` names (its content), else the
    set built from the teacher, by its inputs key `built_key` (the pipeline computes it: the teacher's samples and
    exact mode, the student's prompt, the set's format)."""
    given = cfg.training.soft_labels
    if given:
        p = Path(given)
        p = p / "soft_labels.parquet" if p.is_dir() else p
        return {"file_sha256": file_sha256(p)} if p.is_file() else {"path": str(p)}
    if built_key is None:
        raise ValueError(f"training.objective {cfg.training.objective} without training.soft_labels: the key of the "
                         "soft-label set built from the teacher is needed (the pipeline's train stage passes it)")
    return {"key": built_key}


def train_key(cfg: ExperimentConfig, dataset: Path, *, placebo: bool = False,
              soft_labels_key: str | None = None) -> str:
    """The training set's content (sha256), the student's weights, the training section minus the knobs that
    cannot change the adapter (`TRAIN_OPERATIONAL`); the base's dtype where it is not auto's choice; the
    objective's knobs and its target (`soft_labels_identity`; `soft_labels_key`: the built set's key where
    `training.soft_labels` names none) only where the objective is not sft. `placebo`: the key of the placebo
    adapter (`dataset` is then the placebo set)."""
    t = cfg.training
    ident = {"dataset": file_sha256(dataset), "student": model_identity(cfg.models.student),
             "training": t.model_dump(mode="json", exclude=set(TRAIN_OPERATIONAL) | set(TRAIN_OBJECTIVE) |
                                      set(TRAIN_DTYPE))}
    auto = "bfloat16" if t.use_gpu else "float32"
    if t.dtype not in ("auto", auto):
        ident["dtype"] = t.dtype
    if t.objective != "sft":
        ident["objective"] = {"objective": t.objective, "soft_labels": soft_labels_identity(cfg, soft_labels_key),
                              "distribution_weight": t.distribution_weight if t.objective == "sft+distribution"
                              else None}
        if t.objective == "distribution":
            # 2: an epoch covers every scenario (before, the loop stayed on its first effective batch): adapters
            # trained before that fix are not reused.
            ident["objective"]["loop"] = 2
    return digest({**ident, "placebo": True} if placebo else ident)[:SHORT]


def role_key(identity: dict) -> str:
    return digest(identity)[:SHORT]

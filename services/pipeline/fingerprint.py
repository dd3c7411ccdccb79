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
                     teacher_lead switch), the scenarios it measures (ids and the packs' contents) and the evaluate
                     section's metric settings: an unchanged key finds every row in the stores (the pipeline then
                     needs no serving app for it)

The hashing and the keys of single config sections live below the services (`services.common.fingerprint`:
generate_key, train_key, role_key, model_identity); this module holds the keys that span services.
"""

from __future__ import annotations

from tomtransfer.shared.config import ExperimentConfig

from pathlib import Path

from tomtransfer.services.collector.generate import generate_dir
from tomtransfer.services.collector.jobs import select_scenarios
from tomtransfer.services.common.fingerprint import EVALUATE_OPERATIONAL, SHORT, digest, file_sha256, model_identity
from tomtransfer.services.evaluator.collect import store_dirs
from tomtransfer.services.trainer.softlabels import FORMAT_VERSION


def soft_labels_key(cfg: ExperimentConfig) -> str:
    """The soft-label set built from the teacher (`services.pipeline.stages.soft_label_set`): the generate stage's
    key (the teacher's samples: its weights, sampling, instruction, scenarios), the teacher's weights and exact mode
    at the sampling temperature on its own instruction, the student's evaluation instruction (the prompt the loss
    is computed under) and the set's format version."""
    return digest({"samples": generate_dir(cfg).name, "teacher": model_identity(cfg.models.teacher),
                   "teacher_instruction": cfg.generate.instruction, "temperature": cfg.sampling.temperature,
                   "instruction": cfg.evaluate.instruction_for("student_finetuned"),
                   "format": FORMAT_VERSION})[:SHORT]


def train_soft_labels_key(cfg: ExperimentConfig) -> str | None:
    """What the train key needs of the built soft-label set: its key where the objective trains on it (not sft,
    no `training.soft_labels` given), else None (`services.common.fingerprint.train_key`)."""
    if cfg.training.objective == "sft" or cfg.training.soft_labels:
        return None
    return soft_labels_key(cfg)


def evaluate_key(cfg: ExperimentConfig, adapters: dict | None = None) -> str:
    """The evaluate stage's inputs: every store it reads (`services.evaluator.collect.store_dirs`: one per role
    and the teacher's leading-answer store; their names are their own keys), the scenarios it measures and the
    metric settings."""
    stores = {unit: d.parent.name for unit, d in store_dirs(cfg, adapters).items()}
    # the teacher's reference in-sample: the generate stage's samples
    dataset = generate_dir(cfg).name if cfg.teacher_from_dataset else None
    scenarios = [s.id for s in select_scenarios(cfg, list(cfg.evaluate.families))]
    packs = [file_sha256(Path(p)) for p in cfg.scenarios.packs if Path(p).is_file()]
    return digest({"stores": stores, "teacher_dataset": dataset, "scenarios": scenarios, "packs": packs,
                   "evaluate": cfg.evaluate.model_dump(mode="json", exclude=set(EVALUATE_OPERATIONAL))})[:SHORT]

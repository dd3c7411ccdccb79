"""`tomtransfer train --config FILE`: LoRA fine-tuning of the student on the teacher's training set.

1. The training set: `--dataset` if given, else `<run_dir>/generate/<key>/dataset/train.parquet` (written by
   `tomtransfer generate`); if only the raw samples exist (`<run_dir>/generate/<key>/samples/`), the training set is
   built from them first with the config's `generate.targets` / `generate.valid_policy`.
2. The student: `models.student.model` (alias, HF id in the local cache, or folder; see `tomtransfer models`).
3. Tracking: `mlflow.tracking_uri`, else a local MLflow server for the duration (store `<output_dir>/mlflow`,
   the one `make mlflow-ui` opens). The training set is logged as the training run's dataset input.
4. Ray Train (`services.trainer.train.run_training`): re-running the same command resumes an interrupted run.

Errors a user can fix raise `shared.errors.UserError` (the CLI prints one line and exits with code 2).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shared.errors import UserError


def training_set_path(cfg, dataset: str | Path | None = None) -> Path:
    """The training set's Parquet path, building it from the raw samples when only those exist."""
    from services.trainer.dataset import TRAIN_PARQUET, export_training_set

    if dataset is not None:
        p = Path(dataset)
        p = p / TRAIN_PARQUET if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"training set not found: {p}")
        return p
    from services.teacher.generate import generate_dir

    gen = generate_dir(cfg)
    p = gen / "dataset" / TRAIN_PARQUET
    if p.is_file():
        return p
    samples = gen / "samples" / "samples.parquet"
    if samples.is_file():
        ex = export_training_set(samples, gen / "dataset", name=cfg.name, targets=cfg.generate.targets,
                                 valid_policy=cfg.generate.valid_policy)
        return ex.parquet
    raise UserError(f"training set not found: {p} (run `tomtransfer generate` first, or pass --dataset)")


@contextmanager
def _tracking(cfg) -> Iterator[str]:
    if cfg.mlflow.tracking_uri:
        yield cfg.mlflow.tracking_uri
        return
    from services.common.mlflow_server import MlflowServer

    with MlflowServer(Path(cfg.output_dir) / "mlflow") as server:
        yield server.uri


def train(config_path: str | Path, *, dataset: str | Path | None = None, checkpoint_every: int = 0) -> dict:
    """Run the train stage for a config file; returns `run_training`'s result dict."""
    from services.trainer.dataset import DatasetError, DatasetExport, log_dataset_to_mlflow
    from services.trainer.train import ensure_mlflow_run, run_training
    from shared.config import load_config

    from services.common.models import resolve_model

    cfg = load_config(config_path)
    if checkpoint_every < 0:
        raise UserError("--checkpoint-every must be >= 0")
    try:
        resolve_model(cfg.models.student.model)  # an unknown student fails here, before MLflow or Ray start
    except UserError as e:
        raise UserError(f"models.student.model: {e}") from None
    path = training_set_path(cfg, dataset)
    with _tracking(cfg) as uri:
        cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})
        run_id = ensure_mlflow_run(cfg, uri, dataset_path=path)
        try:
            ex = DatasetExport.from_dir(path.parent)
        except DatasetError:
            ex = None  # a bare Parquet file: no card to log
        if ex is not None:
            log_dataset_to_mlflow(ex, run_id=run_id, tracking_uri=uri)
        return run_training(cfg, path, cfg.models.student.model, uri, run_id=run_id,
                            checkpoint_every_steps=checkpoint_every)

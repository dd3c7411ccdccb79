"""The trainer: training sets (and their placebo), soft-label sets, and the Ray Train LoRA recipe
(`run_training`)."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "run_training": "train",
    "resolve_student": "train",
    "train_dir": "train",
    "TrainError": "train",
    "export_training_set": "dataset",
    "export_placebo_set": "dataset",
    "DatasetExport": "dataset",
    "DatasetError": "dataset",
    "build_soft_labels": "softlabels",
    "export_soft_labels": "softlabels",
    "read_soft_labels": "softlabels",
    "SoftLabelExport": "softlabels",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

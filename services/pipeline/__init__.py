"""The pipeline: the only code that knows about stages (stages/: one module per stage, owning its inputs
key, MLflow run and stages.json record), the preflight every command runs first, the tracking and serving
resources, the workflows (`run` and one stage alone) and sweeps."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "generate": "run",
    "train": "run",
    "evaluate": "run",
    "RunResult": "run",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

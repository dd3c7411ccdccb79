"""The evaluator: the three roles (and the placebo student) collected by the protocol, scored with the
paper's metrics and the transfer measurement, drawn, reported and logged to MLflow."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "Evidence": "collect",
    "evaluate": "scoring",
    "EvaluationResult": "scoring",
    "Outputs": "report",
    "write_outputs": "report",
    "evaluate_and_log": "tracking",
    "log_evaluation": "tracking",
    "ReportError": "rerun",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

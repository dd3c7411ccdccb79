"""Below every service: the offline model store, content hashes and keys, the checks every command runs
first, one way to print, the local MLflow server."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "resolve_model": "models",
    "fetch": "models",
    "list_models": "models",
    "digest": "fingerprint",
    "file_sha256": "fingerprint",
    "dir_sha256": "fingerprint",
    "model_identity": "fingerprint",
    "generate_key": "fingerprint",
    "train_key": "fingerprint",
    "role_key": "fingerprint",
    "check_models": "checks",
    "check_secrets": "checks",
    "check_bind": "checks",
    "check_endpoint": "checks",
    "secret": "checks",
    "serving_api_key": "checks",
    "say": "console",
    "MlflowServer": "mlflow_server",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

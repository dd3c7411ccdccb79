"""Adapter sources: which ones `POST /v1/adapters` may load (`AdapterPolicy`, the security checks) and how a
source becomes a local PEFT folder (`fetch_adapter`: a local path, or MLflow artifacts downloaded once).

Adapters are registered in the ingress (config `serving.adapters` + the POST/DELETE routes) and travel
with each request (name + source), so every student replica loads an adapter on first use (MLflow URIs are
downloaded to `<cache>/adapters/`) and keeps at most `serving.max_adapters` (default 16) loaded,
least recently used first out. Adapters registered over HTTP live as long as the ingress replica.
"""

import hashlib
import os
import re
from pathlib import Path

from tomtransfer.shared.errors import UserError

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
ADAPTER_REFUSED = ("adapter source refused: give a PEFT adapter folder under serving.adapter_root or a runs:/, "
                   "models:/ or mlflow-artifacts: URI of the configured MLflow tracking server")
ADAPTER_SEARCH_DEPTH = 3  # adapter_config.json is looked for at most this many folders below a source
_LOCAL_STORES = ("", "file", "sqlite", "postgresql", "mysql", "mssql")  # tracking stores with local artifacts


class AdapterSourceError(UserError):
    """A source `POST /v1/adapters` may not use, that does not exist or that does not load: one status and one
    message for all of them (no oracle of which server paths or runs exist); the reason is logged only."""

    status = 400
    param = "source"
    code = "adapter_source_refused"

    def __init__(self, reason: str):
        super().__init__(ADAPTER_REFUSED)
        self.reason = reason


def adapter_cache_dir() -> Path:
    from tomtransfer.services.common.models import cache_root

    return cache_root() / "adapters"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _dot_segments(path: str) -> bool:
    from urllib.parse import unquote

    return any(seg in (".", "..") for p in (path, unquote(path)) for seg in p.split("/"))


def effective_adapter_root(cfg) -> str | None:
    """`serving.adapter_root` as an absolute, symlink-free path; null -> the run's folder; false -> None."""
    root = cfg.serving.adapter_root
    if root is False:
        return None
    return os.path.realpath(Path(root if root is not None else cfg.run_dir).expanduser())


class AdapterPolicy:
    """Which adapter sources `POST /v1/adapters` may load (config adapters are the operator's: not limited).

    - A local folder that resolves (symlinks followed) inside `root`, as does every file of the adapter folder
      found there; a relative path is relative to `root`; `root` None: local paths refused.
    - `runs:/RUN/PATH` and `models:/...` (no host part): resolved against the app's own tracking URI, and the
      artifact location they point at must be that server's (`mlflow-artifacts:` without a host or with its
      host:port, http(s) on its host:port) or, for a local tracking store (file, sqlite, a database), local.
    - `mlflow-artifacts:/PATH`, or `mlflow-artifacts://HOST:PORT/PATH` where HOST:PORT is the tracking server's.
    Anything else (other schemes or hosts, credentials, queries, `.`/`..` segments, no tracking URI) is refused.
    `check` does no I/O, so the ingress refuses before anything connects; the replica checks again and resolves.
    """

    def __init__(self, root: str | None, tracking_uri: str | None):
        from urllib.parse import urlparse

        self.root = root
        self.tracking_uri = tracking_uri
        self.tracking = urlparse(tracking_uri) if tracking_uri else None

    # ---- pure checks
    def check(self, source: str) -> tuple[str, str]:
        """("path", absolute normalised path) or ("mlflow", uri); AdapterSourceError otherwise. No I/O."""
        if not source or any(ord(c) < 32 or ord(c) == 127 for c in source):
            raise AdapterSourceError("empty or control characters")
        if source.startswith(MLFLOW_SCHEMES):
            self._check_uri(source)
            return "mlflow", source
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", source):  # file:, s3:, http:, runs:// ...
            raise AdapterSourceError("unsupported scheme")
        if self.root is None:
            raise AdapterSourceError("local paths are refused (serving.adapter_root: false)")
        return "path", os.path.normpath(os.path.join(self.root, source))

    def _same_server(self, p, scheme: str | None = None) -> bool:
        t = self.tracking
        try:
            if p.username is not None or p.password is not None or not p.hostname:
                return False
            default = 443 if t.scheme == "https" else 80
            return (p.hostname.lower() == (t.hostname or "").lower() and (p.port or default) == (t.port or default)
                    and (scheme is None or scheme == t.scheme))
        except ValueError:  # a bad port
            return False

    def _check_uri(self, uri: str) -> None:
        from urllib.parse import urlparse

        if self.tracking is None:
            raise AdapterSourceError("no MLflow tracking URI is configured")
        if any(c.isspace() or c == "\\" for c in uri):
            raise AdapterSourceError("whitespace or backslash in a URI")
        p = urlparse(uri)
        if p.query or p.fragment or p.params or _dot_segments(p.path):
            raise AdapterSourceError("query, fragment or dot segments")
        if p.scheme in ("runs", "models"):
            if p.netloc or not re.fullmatch(r"/[^/].*", p.path):
                raise AdapterSourceError("runs:/ and models:/ URIs take no host")
            return
        if self.tracking.scheme not in ("http", "https"):
            raise AdapterSourceError("mlflow-artifacts: needs an http(s) tracking server")
        if p.netloc and not self._same_server(p):
            raise AdapterSourceError("mlflow-artifacts: URI of another host")

    def check_location(self, uri: str) -> None:
        """The artifact location a runs:/ or models:/ URI resolved to must be the tracking server's own."""
        from urllib.parse import urlparse

        p = urlparse(uri)
        t = self.tracking
        if p.query or p.fragment or _dot_segments(p.path):
            raise AdapterSourceError(f"artifact location {uri!r}: query, fragment or dot segments")
        if p.scheme == "mlflow-artifacts" and t.scheme in ("http", "https") and (not p.netloc or self._same_server(p)):
            return
        if p.scheme in ("http", "https") and self._same_server(p, p.scheme):
            return
        if p.scheme in ("", "file") and p.netloc in ("", "localhost") and t.scheme.split("+")[0] in _LOCAL_STORES:
            return
        raise AdapterSourceError(f"artifact location {uri!r} is not on the tracking server")

    # ---- resolution (I/O; in the replica)
    def resolve_local(self, path: str) -> str:
        if self.root is None:
            raise AdapterSourceError("local paths are refused")
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if not _inside(real, root):
            raise AdapterSourceError(f"{real} is outside {root}")
        folder = find_adapter_folder(real)
        if folder is None:
            raise AdapterSourceError(f"no adapter_config.json under {real}")
        for entry in os.scandir(folder):  # what the engine reads must be inside the root too
            if not _inside(os.path.realpath(entry.path), root):
                raise AdapterSourceError(f"{entry.path} resolves outside {root}")
        return os.path.realpath(folder)

    def resolve_mlflow(self, uri: str) -> str:
        """runs:/ and models:/ -> the artifact location they point at (asked of the tracking URI only), checked."""
        from urllib.parse import urlparse

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        for _ in range(4):  # a model version may point at a logged model (models:/m-...) or a run
            p = urlparse(uri)
            if p.scheme == "runs":
                run_id, _, path = p.path.lstrip("/").partition("/")
                base = client.get_run(run_id).info.artifact_uri
            elif p.scheme == "models":
                from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
                from mlflow.store.artifact.utils.models import get_model_name_and_version

                head, path = ModelsArtifactRepository.split_models_uri(uri)
                got = get_model_name_and_version(client, head)
                base = (client.get_logged_model(got[0]).artifact_location if len(got) == 1
                        else client.get_model_version_download_uri(*got))
            else:
                break
            path = path.strip("/")
            uri = base.rstrip("/") + (f"/{path}" if path else "")
            if uri.startswith(("runs:", "models:")):
                self._check_uri(uri)
        else:
            raise AdapterSourceError("too many indirections")
        self.check_location(uri)
        return uri


def find_adapter_folder(top: str | Path) -> str | None:
    """The shallowest folder at most ADAPTER_SEARCH_DEPTH below `top` that holds adapter_config.json (symlinked
    folders are not followed below `top`)."""
    level = [str(top)] if os.path.isdir(top) else []
    for _ in range(ADAPTER_SEARCH_DEPTH + 1):
        nxt = []
        for d in level:
            if os.path.isfile(os.path.join(d, "adapter_config.json")):
                return d
            try:
                nxt += sorted(e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
        level = nxt
    return None


def fetch_adapter(source: str, tracking_uri: str | None = None, policy: AdapterPolicy | None = None) -> str:
    """A local adapter folder for a local path or an MLflow artifact URI (downloaded once, cached).

    `policy` None: a config adapter (the operator's), any local path or MLflow URI. Else a source from
    `POST /v1/adapters`: limited by the policy (AdapterSourceError)."""
    if policy is not None:
        kind, checked = policy.check(source)
        if kind == "path":
            return policy.resolve_local(checked)
        root = _download(source, policy.tracking_uri, lambda: policy.resolve_mlflow(source))
        folder = find_adapter_folder(root)
        if folder is None:
            raise AdapterSourceError(f"no adapter_config.json in {source}")
        return folder
    if source.startswith(MLFLOW_SCHEMES):
        root = _download(source, tracking_uri, lambda: source)
    elif "://" in source:
        raise UserError(f"unsupported adapter source {source!r}: a local path or runs:/, models:/, mlflow-artifacts:/")
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise UserError(f"adapter path {source} does not exist")
    folder = find_adapter_folder(root)
    if folder is None:
        raise UserError(f"no peft adapter (adapter_config.json) under {source}")
    return folder


def _download(source: str, tracking_uri: str | None, resolve) -> Path:
    """`<cache>/adapters/<hash of tracking URI + source>`: the artifacts at `resolve()`, downloaded once."""
    import shutil

    import mlflow

    dst = adapter_cache_dir() / hashlib.sha256(f"{tracking_uri}|{source}".encode()).hexdigest()[:16]
    done = dst / ".complete"
    if not done.is_file():
        from filelock import FileLock

        dst.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dst) + ".lock"):
            if not done.is_file():
                tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    mlflow.artifacts.download_artifacts(artifact_uri=resolve(), dst_path=str(tmp),
                                                        tracking_uri=tracking_uri)
                except AdapterSourceError:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                except Exception as e:  # noqa: BLE001 - any MLflow failure is a bad source for the caller
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise UserError(f"cannot download adapter {source}: {type(e).__name__}: {e}") from None
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)
                done.write_text(source)
    return dst

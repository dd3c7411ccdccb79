"""The serving app: teacher and student as named models on one OpenAI-compatible HTTP API (Ray Serve).

Import path for `serve run` / a RayService `serveConfigV2`: `services.teacher.app:build_app`, with args
`{"config": "/path/to/experiment.yaml"}` (or `{"config_data": {...}}`, the config inline). Locally:
`tomtransfer serve --config FILE` (services/teacher/serve_cli.py).

Layout: one ingress deployment (FastAPI, `tomtransfer-ingress`, 0 CPUs) routes to two engine deployments,
`tomtransfer-teacher` and `tomtransfer-student` (`ModelServer`, one engine each, chosen by
`models.<role>.engine` through the registry in `engines/base.py`; replicas/CPUs/GPUs from the same spec).

HTTP API (base URL `http://<serving.host>:<serving.port>/v1`; errors are OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}` with 400 (bad input, over a cap), 401 (auth), 404
(unknown model/adapter/route), 409 (adapter name taken), 502 (a remote teacher failed)):

- `GET /v1/models` - `teacher`, `student`, and `student:<adapter>` for every registered adapter.
- `POST /v1/chat/completions` - OpenAI chat completions: `model`, `messages`, `n`
  (<= serving.max_n), `temperature` (0..2), `top_p`, `max_tokens` / `max_completion_tokens`
  (<= serving.max_tokens_cap; default sampling.max_tokens), `seed`, `stop` (string or list),
  `logprobs` / `top_logprobs` (0..20), `stream` (+ `stream_options.include_usage`: server-sent
  `chat.completion.chunk` events, then `data: [DONE]`; the completion is generated whole first and then
  sent in word-sized chunks). Extensions: `ignore_eos`, `stop_at_answer` ("choice" | "contribution", end
  each sample once its leading answer is decided), `endowment`. The response carries the usual
  `choices`/`usage`, and each choice its own `completion_tokens` (an extension). Unsupported OpenAI options
  (`tools`, penalties != 0, ...) -> 400.
- `POST /v1/exact` - exact mode (see services/teacher/exact.py for the definition). Request:
  `{"model": "student:tom", "messages": [...]}` or `{"model": ..., "scenario": "IR_prison",
  "instruction": "answer_only"}` (built with shared.prompts.build_messages from the catalog + config
  packs), `temperature` (default sampling.temperature), `kind` ("choice" | "contribution"; default from the
  scenario, else "choice"), `endowment` (default: the scenario's, else 10), optional `min_mass` (1e-6),
  `max_depth` (8). Response: `{"object": "exact", "model", "scenario", "kind", "temperature", "p",
  "p_C", "p_D", "p_C_given_valid"` (choice) or `"contributions", "mean_given_valid"` (contribution),
  `"valid_mass", "invalid_mass", "unresolved_mass", "forward_passes", "prompt_tokens", "method",
  "approximate", "top_tokens"}`.
- `GET /v1/adapters`, `POST /v1/adapters` `{"name": "tom", "source": "<path or runs:/..., models:/...,
  mlflow-artifacts:/...>", "replace": false}` (loads it on a student replica before answering, so a bad
  adapter is a 400 here, not later), `DELETE /v1/adapters/{name}`. Sources over HTTP are limited
  (`AdapterPolicy`): local folders under `serving.adapter_root` (after symlinks), MLflow URIs of the
  configured tracking server only; every refused, missing or unloadable source gets the same 400.
- `GET /health` - 200 when the ingress is up (no auth).

Limits: a body over `serving.max_body_bytes` is a 413; more than `serving.max_messages` messages, over
`serving.max_message_chars` characters, `serving.max_stop_strings` stop strings or
`serving.max_guided_choices` choices are 400s naming the param.

Auth: when `serving.auth_token_env` names an environment variable, every `/v1` route needs
`Authorization: Bearer <its value>` (401 otherwise). The variable must be set where the replicas run.

Adapters are registered in the ingress (config `serving.adapters` + the POST/DELETE routes) and travel
with each request (name + source), so every student replica loads an adapter on first use (MLflow URIs are
downloaded to `<cache>/adapters/`) and keeps at most `serving.max_adapters` (default 16) loaded,
least recently used first out. Adapters registered over HTTP live as long as the ingress replica.
"""



import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import UserError

log = logging.getLogger("ray.serve")

ROLES = ("teacher", "student")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
ADAPTER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error", 413: "invalid_request_error", 502: "upstream_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _pack_error(e: Exception) -> dict:
    """An engine-side error as a plain value (crosses the Ray boundary without exception pickling)."""
    if isinstance(e, UserError):
        return {"error": {"status": getattr(e, "status", 400), "message": str(e), "param": getattr(e, "param", None),
                          "code": getattr(e, "code", None)}}
    raise e


def _unpack(result: dict) -> Any:
    if "error" in result:
        err = result["error"]
        raise APIError(err["status"], err["message"], err.get("param"), err.get("code"))
    return result["ok"]


# -------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...); unknown keys are ignored, but
    # options that would change results and that we do not implement are rejected explicitly below.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    stop_at_answer: Literal["choice", "contribution"] | None = None
    endowment: int = Field(default=10, ge=0, le=10_000)
    # vLLM's names for choice-constrained sampling: `guided_choice` (older) or `structured_outputs.choice`.
    guided_choice: list[str] | None = Field(default=None, min_length=1)  # count capped by serving.max_guided_choices
    structured_outputs: dict[str, Any] | None = None

    def choices(self) -> tuple[str, ...] | None:
        if self.structured_outputs is not None:
            extra = set(self.structured_outputs) - {"choice"}
            if extra or not isinstance(self.structured_outputs.get("choice"), list):
                raise APIError(400, "structured_outputs: only {'choice': [...]} is supported", "structured_outputs")
            if not self.structured_outputs["choice"]:
                raise APIError(400, "structured_outputs.choice: give at least one choice", "structured_outputs")
            return tuple(str(c) for c in self.structured_outputs["choice"])
        return tuple(self.guided_choice) if self.guided_choice is not None else None


_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                "prediction", "audio", "modalities")


class ExactBody(_Body):
    model: str
    messages: list[MessageIn] | None = None
    scenario: str | None = None
    instruction: Literal["answer_only", "answer_motivation"] = "answer_only"
    temperature: float | None = Field(default=None, ge=0, le=5)
    kind: Literal["choice", "contribution"] | None = None
    endowment: int | None = Field(default=None, ge=0, le=10_000)
    min_mass: float = Field(default=1e-6, gt=0, lt=0.1)
    max_depth: int = Field(default=8, ge=1, le=32)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1)
    replace: bool = False


def _check_adapter_name(name: str) -> None:
    if not set(name) <= ADAPTER_NAME_CHARS:
        raise APIError(400, "adapter names may only hold letters, digits, '-', '_' and '.'", "name")


# ---------------------------------------------------------------------------------------- adapters
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
    from services.common.models import cache_root

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


# -------------------------------------------------------------------------------------- model server
@serve.deployment(max_ongoing_requests=256, health_check_period_s=30, health_check_timeout_s=60)
class ModelServer:
    """One engine (teacher or student) + lazily loaded adapters. Methods return {"ok": ...} or {"error": ...}."""

    def __init__(self, role: str, spec: dict, tracking_uri: str | None = None, adapter_root: str | None = None,
                 max_adapters: int = 16):
        from services.teacher.engines.base import engine_class
        from shared.config import ModelSpec

        self.role = role
        self.spec = ModelSpec.model_validate(spec)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        cls = engine_class(self.spec.engine)
        kwargs: dict[str, Any] = {}
        if self.spec.engine == "transformers":
            kwargs["threads"] = self.spec.threads or max(1, int(round(self.spec.num_cpus)))
        self.engine = cls(self.spec, **kwargs)
        self.policy = AdapterPolicy(adapter_root, self.tracking_uri)
        # adapter name -> (source, restricted), LRU order
        self.sources: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self.max_adapters = max_adapters  # serving.max_adapters

    async def _ensure_adapter(self, name: str, source: str, restricted: bool = False) -> None:
        """Load adapter `name` from `source` unless loaded; `restricted`: a source from POST /v1/adapters,
        limited by the policy, and every failure (refused, missing, unloadable) is the one AdapterSourceError."""
        if self.sources.get(name) == (source, restricted):
            self.sources.move_to_end(name)
            return
        import asyncio

        loop = asyncio.get_running_loop()
        if restricted:
            try:
                path = await loop.run_in_executor(None, fetch_adapter, source, self.tracking_uri, self.policy)
                await self.engine.load_adapter(name, path)
            except Exception as e:  # noqa: BLE001 - one answer for every failure; the reason is logged here
                reason = e.reason if isinstance(e, AdapterSourceError) else f"{type(e).__name__}: {e}"
                log.warning("adapter %r: source %r refused: %s", name, source[:300], str(reason)[:500])
                raise AdapterSourceError(reason) from None
        else:
            path = await loop.run_in_executor(None, fetch_adapter, source, self.tracking_uri)
            await self.engine.load_adapter(name, path)
        self.sources[name] = (source, restricted)
        self.sources.move_to_end(name)
        while len(self.sources) > self.max_adapters:
            old, _ = self.sources.popitem(last=False)
            await self.engine.unload_adapter(old)

    async def chat(self, request, adapter_source: str | None = None, restricted: bool = False) -> dict:
        try:
            if request.adapter is not None:
                await self._ensure_adapter(request.adapter, adapter_source, restricted)
            return {"ok": await self.engine.chat(request)}
        except Exception as e:  # noqa: BLE001 - user errors become values, others propagate
            return _pack_error(e)

    async def exact(self, request, adapter_source: str | None = None, restricted: bool = False) -> dict:
        try:
            if request.adapter is not None:
                await self._ensure_adapter(request.adapter, adapter_source, restricted)
            return {"ok": (await self.engine.exact(request)).to_dict()}
        except Exception as e:  # noqa: BLE001
            return _pack_error(e)

    async def load_adapter(self, name: str, source: str, restricted: bool = False) -> dict:
        try:
            self.sources.pop(name, None)
            await self._ensure_adapter(name, source, restricted)
            return {"ok": True}
        except Exception as e:  # noqa: BLE001
            return _pack_error(e)

    async def unload_adapter(self, name: str) -> dict:
        if name in self.sources:
            self.sources.pop(name)
            try:
                await self.engine.unload_adapter(name)
            except Exception as e:  # noqa: BLE001
                return _pack_error(e)
        return {"ok": True}

    async def info(self) -> dict:
        return {"ok": {"role": self.role, **self.engine.info()}}


# --------------------------------------------------------------------------------------- streaming
_PIECE = re.compile(r"\s*\S+|\s+\Z")  # words with their leading whitespace; joined they give the text back


def _sse_events(choices, *, cid: str, created: int, model: str, fingerprint: str, usage: dict | None) -> list[str]:
    """A finished completion as OpenAI `chat.completion.chunk` server-sent events (as vLLM sends them): per
    choice a role chunk, content chunks (per token where the logprobs' tokens spell the text, else per word;
    round robin over the choices), a final chunk with its finish_reason; then, with include_usage, a chunk
    with `usage` and no choices; then `data: [DONE]`."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint}

    def event(payload: dict) -> str:
        return "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n"

    def chunk(i: int, delta: dict, finish: str | None = None, lp: list | None = None) -> str:
        payload = {**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                        "logprobs": None if lp is None else {"content": lp, "refusal": None}}]}
        if usage is not None:
            payload["usage"] = None
        return event(payload)

    per_choice = []
    for c in choices:
        if c.logprobs is not None and "".join(t.token for t in c.logprobs) == c.text:
            parts = [(t.token, [asdict(t)]) for t in c.logprobs]
        else:
            parts = [(p, None) for p in _PIECE.findall(c.text)]
            if c.logprobs is not None:  # tokens that do not spell the text (a stop string cut): all on one chunk
                lps = [asdict(t) for t in c.logprobs]
                parts = [(parts[0][0], lps), *parts[1:]] if parts else [("", lps)]
        per_choice.append(parts)
    out = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(choices))]
    for k in range(max((len(p) for p in per_choice), default=0)):
        for i, parts in enumerate(per_choice):
            if k < len(parts):
                out.append(chunk(i, {"content": parts[k][0]}, lp=parts[k][1]))
    out += [chunk(i, {}, c.finish_reason) for i, c in enumerate(choices)]
    if usage is not None:
        out.append(event({**head, "choices": [], "usage": usage}))
    out.append("data: [DONE]\n\n")
    return out


async def _aiter(events: list[str], batch_bytes: int = 1 << 16):
    """The events in writes of up to ~64 KB (a write per event would be one Serve message each)."""
    buf: list[str] = []
    size = 0
    for e in events:
        buf.append(e)
        size += len(e)
        if size >= batch_bytes:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


# -------------------------------------------------------------------------------------------- ingress
api = FastAPI(title="tomtransfer serving", version="1", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_request: Request, e: APIError):
    return _json_error(e.status, e.message, e.param, e.code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return _json_error(400, f"{param or 'body'}: {first.get('msg')}{more}", param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, e: StarletteHTTPException):
    return _json_error(e.status_code, str(e.detail))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, teacher, student, serving: dict, defaults: dict, packs: list[str], info: dict,
                 tracking_uri: str | None = None):
        from shared.config import ServingConfig
        from shared.scenarios import build_catalog

        self.handles = {"teacher": teacher, "student": student}
        # caps missing from an older caller's dict take the config defaults
        self.serving = {**ServingConfig().model_dump(mode="json"), **serving}
        self.defaults = defaults
        self.info_static = info
        self.fingerprint = "fp_" + hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
        self.catalog = build_catalog([Path(p) for p in packs])
        self.adapters: dict[str, str] = dict(serving.get("adapters") or {})
        self.restricted: set[str] = set()  # adapters registered over HTTP: their sources stay under the policy
        root = serving.get("adapter_root")
        self.policy = AdapterPolicy(root if isinstance(root, str) else None,
                                    tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        env = serving.get("auth_token_env")
        self.token = None
        if env:
            self.token = os.environ.get(env)
            if not self.token:
                raise UserError(f"serving.auth_token_env names {env}, which is not set where the ingress runs")

    # ------------------------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        import hmac

        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or invalid bearer token", code="invalid_api_key")

    async def _read_capped(self, request: Request) -> bytes:
        """The body, or a 413 as soon as it is over serving.max_body_bytes (Content-Length first, then while
        reading, so a chunked body is cut off too)."""
        cap = int(self.serving["max_body_bytes"])
        too_large = APIError(413, f"the request body is over the cap of {cap} bytes (serving.max_body_bytes)",
                             code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise APIError(400, "invalid Content-Length header")
            if int(length) > cap:
                raise too_large
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > cap:
                raise too_large
        return bytes(buf)

    async def _body(self, request: Request, model: type[BaseModel]):
        raw = await self._read_capped(request)
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            errs = e.errors()
            loc = ".".join(str(x) for x in errs[0]["loc"]) or None
            more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
            raise APIError(400, f"{loc or 'body'}: {errs[0]['msg']}{more}", loc) from None

    def _check_messages(self, messages: list[MessageIn] | None) -> None:
        if messages is None:
            return
        cap = self.serving["max_messages"]
        if len(messages) > cap:
            raise APIError(400, f"messages: {len(messages)} messages are over the cap of {cap} (serving.max_messages)",
                           "messages")
        chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
                    for m in messages)
        cap = self.serving["max_message_chars"]
        if chars > cap:
            raise APIError(400, f"messages: {chars} characters are over the cap of {cap} "
                                "(serving.max_message_chars)", "messages")

    def _route(self, model: str) -> tuple[str, str | None, str | None]:
        """model name -> (role, adapter, adapter source)."""
        role, sep, adapter = model.partition(":")
        if role in ROLES and not sep:
            return role, None, None
        if role == "student" and sep and adapter in self.adapters:
            return role, adapter, self.adapters[adapter]
        raise APIError(404, f"model {model!r} not found; served: {', '.join(self._model_ids())}", "model",
                       "model_not_found")

    def _model_ids(self) -> list[str]:
        return [*ROLES, *(f"student:{a}" for a in sorted(self.adapters))]

    # ------------------------------------------------------------------------------------- routes
    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        now = int(time.time())
        data = []
        for mid in self._model_ids():
            role, _, adapter = mid.partition(":")
            item = {"id": mid, "object": "model", "created": now, "owned_by": "tomtransfer",
                    "root": self.info_static[role]["model"], "parent": role if adapter else None,
                    "engine": self.info_static[role]["engine"]}
            if adapter:
                item["source"] = self.adapters[adapter]
            data.append(item)
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from services.teacher.engines.base import ChatRequest, SamplingParams

        self._auth(request)
        body: ChatBody = await self._body(request, ChatBody)
        extra = set(body.model_extra or {}) & set(_UNSUPPORTED)
        if extra:
            raise APIError(400, f"unsupported option(s): {', '.join(sorted(extra))}", sorted(extra)[0])
        include_usage = False
        if body.stream_options is not None:
            if not body.stream:
                raise APIError(400, "stream_options needs stream=true", "stream_options")
            include_usage = body.stream_options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise APIError(400, "stream_options.include_usage must be a boolean", "stream_options")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence/frequency penalties are not supported", "presence_penalty")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        self._check_messages(body.messages)
        role, adapter, source = self._route(body.model)
        max_n = self.serving["max_n"]
        if body.n > max_n:
            raise APIError(400, f"n={body.n} is over the cap of {max_n} (serving.max_n)", "n")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.defaults["max_tokens"]
        cap = self.serving["max_tokens_cap"]
        if max_tokens > cap:
            raise APIError(400, f"max_tokens={max_tokens} is over the cap of {cap} (serving.max_tokens_cap)",
                           "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_stop = self.serving["max_stop_strings"]
        if len(stop) > max_stop:
            raise APIError(400, f"stop: {len(stop)} strings are over the cap of {max_stop} (serving.max_stop_strings)",
                           "stop")
        if any(not s for s in stop):
            raise APIError(400, "stop: empty strings are not allowed", "stop")
        choices_in = body.choices()
        max_choices = self.serving["max_guided_choices"]
        if choices_in is not None and len(choices_in) > max_choices:
            param = "structured_outputs" if body.structured_outputs is not None else "guided_choice"
            raise APIError(400, f"{param}: {len(choices_in)} choices are over the cap of {max_choices} "
                                "(serving.max_guided_choices)", param)
        params = SamplingParams(n=body.n, temperature=body.temperature, top_p=body.top_p, max_tokens=min(max_tokens, cap),
                                seed=body.seed, stop=tuple(stop), logprobs=body.logprobs,
                                top_logprobs=body.top_logprobs or 0, ignore_eos=body.ignore_eos,
                                stop_at_answer=body.stop_at_answer, endowment=body.endowment,
                                guided_choice=choices_in)
        req = ChatRequest(messages=tuple(m.plain() for m in body.messages), params=params, adapter=adapter)
        result = _unpack(await self.handles[role].chat.remote(req, source, adapter in self.restricted))
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            # The engines answer whole completions: the stream is that answer, sent in word-sized chunks.
            events = _sse_events(result.choices, cid=cid, created=created, model=body.model,
                                 fingerprint=self.fingerprint, usage=usage if include_usage else None)
            return StreamingResponse(_aiter(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = []
        for i, c in enumerate(result.choices):
            lp = None
            if c.logprobs is not None:
                lp = {"content": [asdict(t) for t in c.logprobs], "refusal": None}
            # completion_tokens per choice: an extension (the usage block has only the request's total); the
            # collector stores it per sample, the teacher-cost metrics sum it (services/collector/cost.py)
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "finish_reason": c.finish_reason, "logprobs": lp, "completion_tokens": c.num_tokens})
        return {
            "id": cid, "object": "chat.completion", "created": created,
            "model": body.model, "system_fingerprint": self.fingerprint, "choices": choices,
            "usage": usage, "timings": result.timings,
        }

    @api.post("/v1/exact")
    async def exact(self, request: Request):
        from services.teacher.engines.base import ExactRequest
        from shared.prompts import build_messages

        self._auth(request)
        body: ExactBody = await self._body(request, ExactBody)
        self._check_messages(body.messages)
        role, adapter, source = self._route(body.model)
        scenario = None
        if (body.messages is None) == (body.scenario is None):
            raise APIError(400, "give exactly one of `messages` and `scenario`", "messages")
        if body.scenario is not None:
            scenario = self.catalog.scenarios.get(body.scenario)
            if scenario is None:
                raise APIError(404, f"unknown scenario {body.scenario!r}", "scenario", "scenario_not_found")
            messages = tuple(build_messages(scenario, body.instruction))
        else:
            messages = tuple(m.plain() for m in body.messages)
        kind = body.kind or ("contribution" if scenario is not None and scenario.is_pgg else "choice")
        endowment = body.endowment
        if endowment is None:
            endowment = scenario.game.endowment if scenario is not None and scenario.is_pgg else 10
        temperature = self.defaults["temperature"] if body.temperature is None else body.temperature
        req = ExactRequest(messages=messages, temperature=temperature, kind=kind, endowment=endowment,
                           adapter=adapter, min_mass=body.min_mass, max_depth=body.max_depth)
        result = _unpack(await self.handles[role].exact.remote(req, source, adapter in self.restricted))
        return {"object": "exact", "model": body.model, "scenario": body.scenario, **result}

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": f"student:{n}", "name": n, "source": s}
                                           for n, s in sorted(self.adapters.items())]}

    @api.post("/v1/adapters")
    async def add_adapter(self, request: Request):
        self._auth(request)
        body: AdapterBody = await self._body(request, AdapterBody)
        _check_adapter_name(body.name)
        try:  # no I/O: a refused source never reaches a replica (nothing is read, nothing connects)
            _, source = self.policy.check(body.source)
        except AdapterSourceError as e:
            log.warning("adapter %r: source %r refused: %s", body.name, body.source[:300], e.reason)
            raise APIError(400, ADAPTER_REFUSED, "source", AdapterSourceError.code) from None
        if body.name in self.adapters and self.adapters[body.name] != source and not body.replace:
            raise APIError(409, f"adapter {body.name!r} exists with another source; pass replace=true", "name",
                           "adapter_exists")
        _unpack(await self.handles["student"].load_adapter.remote(body.name, source, True))
        self.adapters[body.name] = source
        self.restricted.add(body.name)
        return {"id": f"student:{body.name}", "name": body.name, "source": source, "object": "adapter"}

    @api.delete("/v1/adapters/{name}")
    async def delete_adapter(self, name: str, request: Request):
        self._auth(request)
        if name not in self.adapters:
            raise APIError(404, f"adapter {name!r} not found", "name", "adapter_not_found")
        del self.adapters[name]
        self.restricted.discard(name)
        _unpack(await self.handles["student"].unload_adapter.remote(name))
        return {"id": f"student:{name}", "deleted": True, "object": "adapter"}


# ------------------------------------------------------------------------------------------ builder
def _load(args: dict):
    from shared.config import load_config, parse_config

    if "config_data" in args:
        return parse_config(args["config_data"], "<config_data>")
    if "config" in args:
        return load_config(args["config"])
    raise UserError("build_app needs args {'config': PATH} or {'config_data': {...}}")


def build_app(args: dict) -> serve.Application:
    """The Serve application for an experiment config (`args`: {"config": path} or {"config_data": dict})."""
    cfg = _load(dict(args or {}))
    serving = cfg.serving.model_dump(mode="json")
    for name in serving["adapters"]:
        _check_adapter_name(name)
    serving["adapter_root"] = root = effective_adapter_root(cfg)
    tracking = cfg.mlflow.tracking_uri
    apps = {}
    info = {}
    for role in ROLES:
        spec = getattr(cfg.models, role)
        info[role] = {"model": spec.model, "engine": spec.engine}
        apps[role] = ModelServer.options(
            name=f"tomtransfer-{role}", num_replicas=spec.num_replicas,
            ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        ).bind(role, spec.model_dump(mode="json"), tracking, root, cfg.serving.max_adapters)
    defaults = {"temperature": cfg.sampling.temperature, "max_tokens": min(cfg.sampling.max_tokens,
                                                                          cfg.serving.max_tokens_cap)}
    return Ingress.options(name="tomtransfer-ingress").bind(
        apps["teacher"], apps["student"], serving, defaults, [str(p) for p in cfg.scenarios.packs], info, tracking)

"""The HTTP ingress: the OpenAI-compatible API (FastAPI behind a Serve deployment, `tomtransfer-ingress`, 0 CPUs)
that checks every request (auth, caps, bodies: services/teacher/schemas.py) and routes it to the teacher or
student replica (services/teacher/replica.py).

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
"""

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tomtransfer.services.common.checks import secret
from tomtransfer.services.teacher.adapters import ADAPTER_REFUSED, AdapterPolicy, AdapterSourceError
from tomtransfer.services.teacher.schemas import (
    ROLES,
    UNSUPPORTED_OPTIONS,
    AdapterBody,
    APIError,
    ChatBody,
    ExactBody,
    MessageIn,
    check_adapter_name,
    error_body,
    unpack,
)

log = logging.getLogger("ray.serve")


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


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
        from tomtransfer.shared.config import ServingConfig
        from tomtransfer.shared.scenarios import build_catalog

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
        self.token = secret(serving.get("auth_token_env"), "serving.auth_token_env (where the ingress runs)")

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
        from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams

        self._auth(request)
        body: ChatBody = await self._body(request, ChatBody)
        extra = set(body.model_extra or {}) & set(UNSUPPORTED_OPTIONS)
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
        result = unpack(await self.handles[role].chat.remote(req, source, adapter in self.restricted))
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
        from tomtransfer.services.teacher.engines.base import ExactRequest
        from tomtransfer.shared.prompts import build_messages

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
        result = unpack(await self.handles[role].exact.remote(req, source, adapter in self.restricted))
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
        check_adapter_name(body.name)
        try:  # no I/O: a refused source never reaches a replica (nothing is read, nothing connects)
            _, source = self.policy.check(body.source)
        except AdapterSourceError as e:
            log.warning("adapter %r: source %r refused: %s", body.name, body.source[:300], e.reason)
            raise APIError(400, ADAPTER_REFUSED, "source", AdapterSourceError.code) from None
        if body.name in self.adapters and self.adapters[body.name] != source and not body.replace:
            raise APIError(409, f"adapter {body.name!r} exists with another source; pass replace=true", "name",
                           "adapter_exists")
        unpack(await self.handles["student"].load_adapter.remote(body.name, source, True))
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
        unpack(await self.handles["student"].unload_adapter.remote(name))
        return {"id": f"student:{name}", "deleted": True, "object": "adapter"}

"""Checks of a config that every entry point runs before it writes or starts anything: a bad input gives one line
(`shared.errors.UserError`, exit 2) and leaves outputs, the MLflow store and the cluster as they were.

  models    every locally served model resolves: an alias of the offline store (fetched into the cache if it is
            not there yet - the cache is not an output), a Hugging Face folder, or a hub id already in the local
            cache; an `openai`-engine model's API-key variable is set
  bind      an app this process starts without a bearer token binds loopback only (unless serving.allow_open)
  port      the port a new local app binds is free: Ray Serve's proxy binds it with SO_REUSEPORT, so a second app on
            a taken port does not fail - the kernel splits the connections between the two apps (another run's
            adapter root, another config), which answer each other's requests
  secrets   `serving.auth_token_env` names a variable that is set (`secret` reads every key from the environment)
  endpoint  a command that talks to a running serving app (`generate`, `evaluate` / `run` with
            `serving.base_url`) finds it before it writes anything: it answers `GET /v1/models` and lists the roles
            it needs (other weights than configured: a note)

`services.pipeline.preflight` composes these with the checks that span stages (packs and scenarios, the training
objective) into the one preflight every command runs.
"""

from __future__ import annotations

import os
import socket
import sys

import httpx

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError

from tomtransfer.services.common.console import say
from tomtransfer.services.common.models import resolve_model


def check_models(cfg: ExperimentConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    for role in roles:
        spec = getattr(cfg.models, role)
        if spec.engine == "openai":
            secret(spec.api_key_env, f"models.{role}.api_key_env")
            continue
        try:
            resolve_model(spec.model, progress=say)
        except UserError as e:
            raise UserError(f"models.{role}.model: {e}") from None


def secret(env: str | None, setting: str) -> str | None:
    """The one reader of a key from the environment: the value of the variable `env` (None when no variable is
    named). A named variable that is not set, or empty, is a UserError naming the `setting` that named it."""
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        raise UserError(f"{setting}: environment variable {env} is not set")
    return value


def serving_api_key(cfg: ExperimentConfig) -> str | None:
    """The serving app's bearer token (`serving.auth_token_env`), for the clients of the app."""
    return secret(cfg.serving.auth_token_env, "serving.auth_token_env")


def check_secrets(cfg: ExperimentConfig) -> None:
    serving_api_key(cfg)


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(cfg: ExperimentConfig) -> None:
    """An open app (no bearer token) binds loopback only, unless serving.allow_open says otherwise."""
    s = cfg.serving
    if not is_loopback(s.host) and not s.auth_token_env and not s.allow_open:
        raise UserError(f"serving.host {s.host} is not a loopback address and serving.auth_token_env is not set: "
                        f"anyone who reaches port {s.port} could use the models; set serving.auth_token_env (a "
                        f"bearer token) or serving.allow_open: true")


def check_port(cfg: ExperimentConfig) -> None:
    """serving.port is free on serving.host, for an app on a local Ray cluster this process is about to start (on a
    cluster it joins, or one it already runs with its app, the proxies are that cluster's own)."""
    if os.environ.get("RAY_ADDRESS") or ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        return
    s = cfg.serving
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"serving.host {s.host}: cannot resolve it ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is not a taker
        try:
            probe.bind(addr)
        except OSError as e:
            raise UserError(f"serving.port {s.port} on {s.host} is taken ({e.strerror}): another serving app or "
                            "process listens there; stop it or set another serving.port") from None


def check_endpoint(cfg: ExperimentConfig, url: str, api_key: str | None, roles: tuple[str, ...] = ("teacher",),
                   timeout_s: float = 10.0) -> None:
    """The serving app at `url` is up and serves `roles` (`GET /v1/models`: its ids); where it reports each id's
    `root` (the model it was configured with) and that differs from this config's, a one-line note on stderr."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    where = f"{url.rstrip('/')}/v1/models"
    hint = "start it with `tomtransfer serve --config <this config>`, or point --base-url / serving.base_url at one"
    try:
        r = httpx.get(where, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise UserError(f"no serving app at {url} ({type(e).__name__}): {hint}") from None
    if r.status_code in (401, 403):
        raise UserError(f"the serving app at {url} refused the API key ({r.status_code}): set the variable named in "
                        "serving.auth_token_env to its token")
    if r.status_code != 200:
        raise UserError(f"the serving app at {url} answered GET /v1/models with {r.status_code}: {hint}")
    try:
        served = {m["id"]: m for m in r.json()["data"]}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{url} is not an OpenAI-compatible app (GET /v1/models gave no model list): {hint}") from None
    for role in roles:
        want = getattr(cfg.models, role).model
        if role not in served:
            raise UserError(f"the serving app at {url} does not serve {role!r} (it serves: {', '.join(served)})")
        root = served[role].get("root")
        if root is not None and root != want:
            # A note, not a refusal: the app may name the same weights another way (a path for an alias); the
            # samples are the app's, and its model is recorded with them.
            say(f"note: the serving app at {url} serves {role} = {root!r}; this config names {want!r} (the samples "
                 "come from the app's model)")

"""Checks of a config that every entry point runs before it writes or starts anything: a bad input gives one line
(`shared.errors.UserError`, exit 2) and leaves outputs, the MLflow store and the cluster as they were.

  models    every locally served model resolves: an alias of the offline store (fetched into the cache if it is
            not there yet - the cache is not an output), a Hugging Face folder, or a hub id already in the local
            cache; an `openai`-engine model's API-key variable is set
  secrets   `serving.auth_token_env` names a variable that is set
  endpoint  a command that talks to a running serving app (`generate`) finds it before it writes anything: it
            answers `GET /v1/models` and lists the roles it needs (other weights than configured: a note)

The pipeline adds the checks that span stages before it runs them (packs and scenarios, the training objective).
"""

from __future__ import annotations

import os
import sys

import httpx

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError

from tomtransfer.services.common.models import resolve_model


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_models(cfg: ExperimentConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    for role in roles:
        spec = getattr(cfg.models, role)
        if spec.engine == "openai":
            if spec.api_key_env and not os.environ.get(spec.api_key_env):
                raise UserError(f"models.{role}.api_key_env: environment variable {spec.api_key_env} is not set")
            continue
        try:
            resolve_model(spec.model, progress=_say)
        except UserError as e:
            raise UserError(f"models.{role}.model: {e}") from None


def check_secrets(cfg: ExperimentConfig) -> None:
    env = cfg.serving.auth_token_env
    if env and not os.environ.get(env):
        raise UserError(f"serving.auth_token_env: environment variable {env} is not set")


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
            _say(f"note: the serving app at {url} serves {role} = {root!r}; this config names {want!r} (the samples "
                 "come from the app's model)")

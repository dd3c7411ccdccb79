"""What `generate` and `evaluate` share around the runner: scenario selection, jobs, the endpoint, run ids.

The endpoint: `serving.base_url` when the config names one (an app started by `tomtransfer serve`, by
`tomtransfer run`, or a deployment), else `http://<serving.host>:<serving.port>` - the address `serve`
binds by default. Bearer token: `services.common.checks.serving_api_key` (the env var named by
`serving.auth_token_env`, if any).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig, load_config
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.prompts import build_messages
from tomtransfer.shared.scenarios import Scenario, build_catalog

from tomtransfer.shared.samples import ADAPTER_SUFFIX, adapter_name, served_model

from tomtransfer.services.collector.runner import Job


def as_config(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    return config if isinstance(config, ExperimentConfig) else load_config(config)


def select_scenarios(cfg: ExperimentConfig, families: list[str]) -> list[Scenario]:
    """The scenarios of `families` (the stage's own: generate.families, evaluate.families), restricted to
    `scenarios.ids` when given: an out-of-sample id listed there must never leak into the teacher dataset."""
    try:
        catalog = build_catalog(cfg.scenarios.packs)
        chosen = [s for s in catalog.select(families, cfg.scenarios.ids) if s.family in families]
    except KeyError as e:
        raise UserError(f"scenarios: {e.args[0]}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"scenarios: {e}") from None
    if not chosen:
        raise UserError(f"no scenarios selected (families {families}, ids {cfg.scenarios.ids})")
    return chosen


def base_url(cfg: ExperimentConfig, override: str | None = None) -> str:
    return (override or cfg.serving.base_url or f"http://{cfg.serving.host}:{cfg.serving.port}").rstrip("/")


def jobs_for(cfg: ExperimentConfig, roles: list[str], scenarios: list[Scenario], n: int,
             instruction: str | dict[str, str], interleave: bool = True,
             max_tokens: dict[str, int] | None = None) -> list[Job]:
    """One job per (role, scenario); `instruction` one for all roles or one per role. Interleaved: scenario-major,
    so replicas of different roles are busy inside the same concurrency window; otherwise role-major."""
    per_role = instruction if isinstance(instruction, dict) else {r: instruction for r in roles}
    pairs = [(s, r) for s in scenarios for r in roles] if interleave else [(s, r) for r in roles for s in scenarios]
    return [Job(role=r, model=served_model(r, cfg.training.adapter_name), scenario=s,
                messages=build_messages(s, per_role[r]), n=n,  # type: ignore[arg-type]
                max_tokens=(max_tokens or {}).get(r))
            for s, r in pairs]


def interleave_roles(cfg: ExperimentConfig) -> bool:
    """`evaluate.role_order`, with auto resolved: two local CPU replicas of the transformers engine share the same
    cores, and running both at once oversubscribes them (measured on 2 cores: the student's exact calls took 2x
    as long beside the teacher's, for no gain in total throughput), so their requests are grouped by role."""
    order = cfg.evaluate.role_order
    if order != "auto":
        return order == "interleaved"
    specs = (cfg.models.teacher, cfg.models.student)
    local_cpu = cfg.serving.base_url is None and all(
        m.engine == "transformers" and m.num_gpus == 0 and m.device != "cuda" for m in specs)
    return not local_cpu


def role_identity(cfg: ExperimentConfig, role: str) -> dict:
    """What a role's samples depend on besides the sampling settings: the weights behind the served name."""
    spec = cfg.models.teacher if role == "teacher" else cfg.models.student
    ident = {"served": served_model(role, cfg.training.adapter_name), "model": spec.model, "engine": spec.engine,
             "remote_model": spec.remote_model}
    if role in ADAPTER_SUFFIX:  # student_finetuned, student_placebo: the adapter named in serving.adapters, if any
        ident["adapter"] = cfg.serving.adapters.get(adapter_name(role, cfg.training.adapter_name))
    return ident


def run_id_for(stage: str, cfg: ExperimentConfig, settings: dict) -> str:
    """A stable id: the same experiment and settings give the same id, so a resumed run keeps it."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.name}-{stage}-{digest}"

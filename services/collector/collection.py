"""The collection sequence, written once: run id -> jobs -> open the store for writing -> check (or record) its
manifest -> request what is missing -> compact.

Every store is filled through `collect_into`: the generate stage's teacher samples (`collector.generate`), each
evaluated role's samples or exact rows and the teacher's leading-answer rows (`evaluator.collect`), the soft-label
set's exact rows (the pipeline's train stage). A `SampleStore` gets N samples per (role, scenario) with the given
request settings (`runner.sample_async`), an `ExactStore` one exact-mode call per scenario at
`sampling.temperature` (`runner.exact_async`). Resumable: a rerun with the same inputs requests only what the
store lacks; a store made with other settings refuses (`store.check_manifest`, `store.MANIFEST_VERSION`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.scenarios import Scenario

from tomtransfer.services.collector.jobs import base_url as endpoint_url, jobs_for, run_id_for
from tomtransfer.services.collector.runner import RequestSettings, RetryPolicy, RunReport, exact_async, sample_async
from tomtransfer.services.collector.store import MANIFEST_VERSION, ExactStore, SampleStore, check_manifest
from tomtransfer.services.common.checks import serving_api_key


@dataclass
class Collected:
    run_id: str
    path: Path  # the compacted store file
    report: RunReport


async def collect_into(store: SampleStore | ExactStore, cfg: ExperimentConfig, *, stage: str, role: str, spec: dict,
                       scenarios: list[Scenario], instruction: str, description: str, concurrency: int,
                       n: int = 1, params: RequestSettings | None = None, max_tokens: int | None = None,
                       settings: dict | None = None, base_url: str | None = None, retry: RetryPolicy | None = None,
                       progress: bool | str | None = None) -> Collected:
    """Fill `store` with `role`'s answers on `scenarios` under `instruction` (see the module docstring).

    `spec`: what the rows depend on, the manifest's entry for `role`; `settings`: store-wide settings recorded in
    the manifest beside it (the generate stage's). The run id (`jobs.run_id_for(stage, ...)`) hashes `spec`, or
    `settings` with `spec` under the role's name when there are settings. `n` samples per scenario and `params`
    (sampled stores); `max_tokens`: the role's token cap where it has its own. `base_url`: the endpoint
    (default: the config's, `jobs.base_url`)."""
    run_id = run_id_for(stage, cfg, {**settings, role: spec} if settings else spec)
    jobs = jobs_for(cfg, [role], scenarios, n, {role: instruction},
                    max_tokens={role: max_tokens} if max_tokens is not None else None)
    url = endpoint_url(cfg, base_url)
    with store.writer():
        check_manifest(store, {"version": MANIFEST_VERSION, "run_id": run_id, **(settings or {}),
                               "roles": {role: spec}})
        if isinstance(store, ExactStore):
            report = await exact_async(store, jobs, base_url=url, temperature=cfg.sampling.temperature,
                                       run_id=run_id, concurrency=concurrency, api_key=serving_api_key(cfg),
                                       retry=retry or RetryPolicy(), progress=progress, description=description)
        else:
            if params is None:
                raise ValueError("a sampled store needs its request settings (params)")
            report = await sample_async(store, jobs, base_url=url, params=params, run_id=run_id,
                                        concurrency=concurrency, api_key=serving_api_key(cfg), retry=retry or RetryPolicy(),
                                        progress=progress, description=description)
        path = store.compact()
    return Collected(run_id=run_id, path=path, report=report)

"""The fan-out collector: scenarios -> prompts -> many requests to the serving app -> crash-safe sample stores.

  jobs.py          what `generate` and `evaluate` ask for: scenario selection, one job per (role, scenario), the
                   endpoint and its token, stable run ids
  runner.py        the requests, fanned out with bounded concurrency, retries and progress; exact-mode calls
  store.py         the Parquet sample schema in files: shard stores that survive kill -9, resumable by (seed, n)
  collection.py    the collection sequence, once: jobs, run id, manifest (one version), requests, compact
  generate.py      the teacher dataset: N motivated samples per scenario, then the training set and its exports
                   (the command, `tomtransfer generate`, is in services/cli.py)
"""

from tomtransfer._exports import lazy

_PUBLIC = {
    "generate_dir": "generate",
    "GenerateResult": "generate",
    "Collected": "collection",
    "collect_into": "collection",
    "SampleStore": "store",
    "ExactStore": "store",
    "StoreError": "store",
    "Job": "runner",
    "RequestSettings": "runner",
    "RetryPolicy": "runner",
    "RunReport": "runner",
    "EndpointError": "runner",
    "select_scenarios": "jobs",
    "jobs_for": "jobs",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

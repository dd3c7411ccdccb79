"""What a stage asked of the teacher: tokens and forward passes, logged as MLflow metrics `teacher_cost.*`.

The unit is the teacher's work, not wall time, so cells of a sweep compare at equal teacher cost (issue 22 item 2):

- generate (sampled text): every sample counts as its own sequence: `tokens` = its prompt tokens + its completion
  tokens; `forward_passes` = one prefill + one decode step per completion token. Summed over the samples. (The engines
  share a prompt's prefill between the samples of one request; this is the cost of the samples as the paper drew
  them, one API call each, and it does not depend on `generate.request_n`.) A sample whose server reported no
  per-sample completion count (a remote endpoint without the extension, n > 1) is counted in `samples_uncounted`
  and adds its prompt only.
- soft labels (exact mode): one call per scenario: `tokens` = its prompt tokens, `forward_passes` = what the engine
  reports (one prefill + the batched expansion steps, typically 1-2), both from the endpoint's answer.
"""

from __future__ import annotations

import json
import math
from typing import Iterable


def _int(v) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)


def samples_cost(rows: Iterable[dict]) -> dict[str, float]:
    """Cost of sampled rows (the sample schema's prompt_tokens, completion_tokens)."""
    prompt = completion = passes = n = uncounted = 0
    for r in rows:
        n += 1
        p, c = _int(r.get("prompt_tokens")), _int(r.get("completion_tokens"))
        prompt += p or 0
        passes += 1
        if c is None:
            uncounted += 1
        else:
            completion += c
            passes += c
    return {"tokens": float(prompt + completion), "forward_passes": float(passes), "prompt_tokens": float(prompt),
            "completion_tokens": float(completion), "samples": float(n), "samples_uncounted": float(uncounted)}


def exact_cost(rows: Iterable[dict]) -> dict[str, float]:
    """Cost of exact-mode rows (the exact schema; `raw` is the endpoint's JSON answer with prompt_tokens and
    forward_passes)."""
    tokens = passes = calls = 0
    for r in rows:
        calls += 1
        raw = r.get("raw")
        data = json.loads(raw) if isinstance(raw, str) and raw else {}
        tokens += _int(data.get("prompt_tokens")) or 0
        passes += _int(data.get("forward_passes")) or 1
    return {"tokens": float(tokens), "forward_passes": float(passes), "calls": float(calls)}


def metrics(cost: dict[str, float], prefix: str = "teacher_cost") -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in cost.items()}

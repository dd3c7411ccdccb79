"""Exact mode on a real pretrained model (Qwen2.5-Coder-0.5B-Instruct, fp32 CPU), against sampling.

P(C) and P(D) from exact mode for an in-sample scenario vs their frequency over 2000 samples drawn at the same
temperature that stop once the leading answer is decided (`stop_at_answer`): within 3 standard errors.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from tomtransfer.services.common.models import is_fetched, model_dir
from tomtransfer.services.teacher.engines.base import ChatRequest, ExactRequest, SamplingParams
from tomtransfer.services.teacher.exact import lead_choice
from tomtransfer.shared.config import ModelSpec
from tomtransfer.shared.prompts import build_messages
from tomtransfer.shared.scenarios import default_catalog

pytestmark = pytest.mark.slow
ALIAS = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen(real_models):
    if not is_fetched(ALIAS):
        pytest.skip(f"{ALIAS} is not fetched (make models, or tomtransfer models fetch {ALIAS})")
    import torch

    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine

    torch.set_num_threads(2)
    e = TransformersEngine(ModelSpec(model=str(model_dir(ALIAS)), device="cpu", max_batch_size=2000))
    yield e
    asyncio.run(e.close())


def test_exact_matches_2000_samples_on_qwen(qwen):
    msgs = tuple(build_messages(default_catalog().scenarios["IR_prison"], "answer_only"))
    T, n = 0.8, 2000
    x = asyncio.run(qwen.exact(ExactRequest(messages=msgs, temperature=T)))
    assert x.valid_mass > 0.5 and x.unresolved_mass < 1e-3, x.to_dict()
    assert x.valid_mass + x.invalid_mass + x.unresolved_mass == pytest.approx(1.0, abs=1e-6)
    r = asyncio.run(qwen.chat(ChatRequest(messages=msgs, params=SamplingParams(
        n=n, temperature=T, max_tokens=16, seed=2024, stop_at_answer="choice"))))
    counts = Counter(lead_choice(c.text) for c in r.choices)
    for answer in ("C", "D"):
        p = x.p[answer]
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts[answer] / n - p) <= 3 * se + x.unresolved_mass, (answer, counts[answer] / n, p, se)

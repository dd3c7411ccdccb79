"""The teacher's cost as the generate and soft-label stages log it (`services.collector.cost`, `teacher_cost.*`)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tomtransfer.services.collector.cost import exact_cost, metrics, samples_cost


def test_samples_cost_counts_prompt_and_completion_per_sample():
    rows = [{"prompt_tokens": 100, "completion_tokens": 40}, {"prompt_tokens": 100, "completion_tokens": 8},
            {"prompt_tokens": 90, "completion_tokens": None}, {"prompt_tokens": 90, "completion_tokens": math.nan}]
    c = samples_cost(rows)
    assert c["tokens"] == 100 + 40 + 100 + 8 + 90 + 90 and c["completion_tokens"] == 48
    assert c["forward_passes"] == (1 + 40) + (1 + 8) + 1 + 1  # a prefill + a decode step per generated token
    assert c["samples"] == 4 and c["samples_uncounted"] == 2
    assert samples_cost([]) == {"tokens": 0.0, "forward_passes": 0.0, "prompt_tokens": 0.0,
                                "completion_tokens": 0.0, "samples": 0.0, "samples_uncounted": 0.0}


def test_exact_cost_reads_the_endpoint_answer():
    rows = [{"raw": json.dumps({"prompt_tokens": 300, "forward_passes": 2})},
            {"raw": json.dumps({"prompt_tokens": 310, "forward_passes": 1})}]
    assert exact_cost(rows) == {"tokens": 610.0, "forward_passes": 3.0, "calls": 2.0}
    assert metrics(exact_cost(rows), "teacher_cost.soft_labels")["teacher_cost.soft_labels.tokens"] == 610.0


def test_stage_cost_from_the_generate_samples(tmp_path):
    """`stages.teacher_cost` reads the generate stage's samples of a config; under sft there is no soft-label part."""
    from tomtransfer.services.collector.generate import generate_dir
    from tomtransfer.services.pipeline.stages import teacher_cost
    from tomtransfer.shared.config import load_config

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "cost", "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": "a"}, "student": {"model": "b"}}, "scenarios": {"ids": ["IR_prison"]},
        "generate": {"samples": 2, "families": ["in_sample"]}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert teacher_cost(cfg) == {"teacher_cost.tokens": 0.0, "teacher_cost.forward_passes": 0.0}  # nothing yet
    path = generate_dir(cfg) / "samples" / "samples.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"role": ["teacher", "teacher"], "prompt_tokens": [200, 200],
                             "completion_tokens": [30, 12]}), path)
    c = teacher_cost(cfg)
    assert c["teacher_cost.generate.tokens"] == c["teacher_cost.tokens"] == 442
    assert c["teacher_cost.forward_passes"] == 31 + 13
    assert not any(k.startswith("teacher_cost.soft_labels") for k in c)

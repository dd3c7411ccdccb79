"""The soft-label set built the way the pipeline builds it: the generate stage's samples of a served teacher, one
exact-mode call per scenario on the teacher's own instruction, combined (`services.pipeline.stages.soft_label_set`).

Starts a server: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest_plugins = ["tests.fixtures.llm_endpoint"]
pytestmark = pytest.mark.netns

SCENARIOS = ["IR_prison", "biz_staghunt", "pgg"]


def test_soft_label_set_from_a_served_teacher(llm_endpoint, tmp_path):
    from tomtransfer.services.collector.generate import generate
    from tomtransfer.services.pipeline.stages import Context, soft_label_dir, soft_label_set
    from tomtransfer.services.trainer.softlabels import SoftLabelExport, read_soft_labels
    from tomtransfer.shared.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "name": "soft", "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": "tiny-teacher"}, "student": {"model": "tiny-student"}},
        "sampling": {"temperature": 0.8, "max_tokens": 8, "seed": 5},
        "scenarios": {"ids": SCENARIOS},
        "serving": {"base_url": llm_endpoint.url},
        "generate": {"samples": 4, "request_n": 4, "valid_policy": "all", "families": ["in_sample", "pgg"]},
        "training": {"objective": "distribution"},
    }))
    cfg = load_config(path)
    generate(cfg, base_url=llm_endpoint.url, progress=False)
    soft = soft_label_set(cfg, Context(tracking_uri=None, url=llm_endpoint.url, progress=False))
    assert soft.parent == soft_label_dir(cfg)
    df = pd.read_parquet(soft)
    ex = SoftLabelExport.from_dir(soft.parent)
    assert ex.rows == len(df) and ex.rows + len(ex.dropped) == len(SCENARIOS)
    assert set(df["instruction"]) == {"answer_only"} and set(df["teacher_instruction"]) == {"answer_motivation"}
    exact = pd.read_parquet(next((soft.parent / "exact").rglob("*.parquet")))
    assert sorted(exact["scenario_id"]) == sorted(SCENARIOS) and set(exact["part"]) == {"lead"}
    for r in df.itertuples(index=False):
        probs = json.loads(r.probs)
        assert abs(sum(probs) - 1) < 1e-6 and r.source in ("exact", "mixture") and r.n_samples == 4
        lead = exact[exact["scenario_id"] == r.scenario_id].iloc[0]
        if r.scenario_id != "pgg":
            assert r.lead_mass == pytest.approx(lead["p_C"] + lead["p_D"])
            assert json.loads(r.actions) == ["C", "D"]
        else:
            assert json.loads(r.actions) == [str(a) for a in range(11)]
    assert [x["scenario_id"] for x in read_soft_labels(soft)] == sorted(df["scenario_id"])
    # the teacher's cost: the generate stage's samples + one exact call (one prompt) per scenario
    from tomtransfer.services.pipeline.stages import teacher_cost

    cost = teacher_cost(cfg)
    raw = [json.loads(x) for x in exact["raw"]]
    assert cost["teacher_cost.soft_labels.calls"] == len(SCENARIOS)
    assert cost["teacher_cost.soft_labels.tokens"] == sum(x["prompt_tokens"] for x in raw) > 0
    assert cost["teacher_cost.soft_labels.forward_passes"] == sum(x["forward_passes"] for x in raw) >= len(SCENARIOS)
    assert cost["teacher_cost.generate.samples"] == 4 * len(SCENARIOS)
    assert cost["teacher_cost.tokens"] == cost["teacher_cost.generate.tokens"] + cost["teacher_cost.soft_labels.tokens"]
    assert cost["teacher_cost.forward_passes"] == \
        cost["teacher_cost.generate.forward_passes"] + cost["teacher_cost.soft_labels.forward_passes"]
    # built once: a second call with the same inputs reuses it (no server needed)
    mtime = soft.stat().st_mtime_ns
    assert soft_label_set(cfg) == soft and soft.stat().st_mtime_ns == mtime

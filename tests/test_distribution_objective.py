"""The distribution objective (issue 22 item 1): the soft-label set, the loss, its config, its bad input.

- soft labels: exact mode's leading mass + the samples that do not lead, combined as `shared.transfer.Choice.mixture`
  (2x2) and per whole amount (PGG); samples alone without an exact row; export, card, hash, read-back;
- the acceptance: the distribution objective moves a tiny random-weight student's choice distribution toward a
  synthetic teacher's, scenario by scenario (KL falls, Spearman of the C-rates > 0.8); the same recipe on the
  targets shuffled across scenarios does not (its KL to the true targets does not fall, the ordering does not match);
- sft+distribution: both losses logged, an interrupted run resumes exactly (same adapter as an uninterrupted one);
- bad input: weights outside (0, 1), an action string that tokenizes to nothing, an empty soft-label set: one line,
  exit 2, nothing written;
- fingerprints: an sft run's train key is unchanged by the new knobs; the objective, the weight (sft+distribution
  only) and the soft labels change it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# one scenario per context: the tiny student's last position tells contexts apart far more easily than payoffs
IDS = ["IR_prison", "biz_staghunt", "environment_snowdrift", "team_delight", "friendsharing_prison",
       "sports_snowdrift", "ventcap_delight", "roomsharing_staghunt"]
P_C = [0.05, 0.2, 0.35, 0.5, 0.62, 0.75, 0.88, 0.97]
SHUFFLE = [3, 5, 7, 0, 6, 1, 2, 4]


def _scenario(sid):
    from tomtransfer.shared.scenarios import default_catalog

    return default_catalog().scenarios[sid]


def _samples(sid, responses_answers):
    return pd.DataFrame({"scenario_id": [sid] * len(responses_answers),
                         "response": [r for r, _ in responses_answers],
                         "answer": [a for _, a in responses_answers],
                         "valid": [a is not None for _, a in responses_answers]})


# ------------------------------------------------------------------------------------------------ soft labels
def test_mixture_is_the_evaluators_choice():
    from tomtransfer.services.trainer.softlabels import scenario_distribution
    from tomtransfer.shared.transfer import Choice

    s = _scenario("IR_prison")
    got = _samples("IR_prison", [("C. Because ...", "C"), ("**D**", "D"),  # lead: exact mode covers them
                                 ("I would choose C, since ...", "C"), ("After thinking, I pick C.", "C"),
                                 ("It depends on the coplayer.", None)])  # the tail: 2 C, 0 D, 1 invalid
    d = scenario_distribution(s, got, {"p_C": 0.5, "p_D": 0.2})
    pc, pd_ = Choice.mixture(0.5, 0.2, 2, 0, 1).probs()
    assert d["source"] == "mixture" and d["n_tail"] == 3 and d["n_samples"] == 5
    assert d["actions"] == ["C", "D"]
    assert d["probs"] == pytest.approx([pc / (pc + pd_), pd_ / (pc + pd_)])
    assert d["probs"] == pytest.approx([0.7 / 0.9, 0.2 / 0.9])
    assert d["lead_mass"] == pytest.approx(0.7) and d["valid_mass"] == pytest.approx(0.9)
    # no exact row: the counts of every sample's parsed answer
    d = scenario_distribution(s, got, None)
    assert d["source"] == "samples" and d["probs"] == pytest.approx([0.75, 0.25]) and d["lead_mass"] is None
    # the whole mass leads: exact alone
    d = scenario_distribution(s, got, {"p_C": 0.6, "p_D": 0.4})
    assert d["source"] == "exact" and d["probs"] == pytest.approx([0.6, 0.4])


def test_pgg_soft_labels_over_whole_amounts():
    from tomtransfer.services.trainer.softlabels import scenario_distribution

    s = _scenario("pgg")
    e = int(s.game.endowment)
    lead = [0.0] * (e + 1)
    lead[5], lead[10] = 0.4, 0.2  # 60 % of the mass leads with a whole amount
    got = _samples("pgg", [("5", "5"), ("I contribute $7.50 because", "7.5"),  # 7.5 does not lead on the grid
                           ("My donation would be 3", "3"), ("Nothing to say", None)])
    d = scenario_distribution(s, got, {"pgg_dist": json.dumps(lead)})
    assert d["actions"] == [str(a) for a in range(e + 1)] and d["source"] == "mixture" and d["n_tail"] == 3
    mass = list(lead)
    mass[8] += 0.4 / 3  # 7.5 rounds half up to 8
    mass[3] += 0.4 / 3
    total = sum(mass)
    assert d["probs"] == pytest.approx([m / total for m in mass])


def test_export_read_and_empty_set(tmp_path):
    from tomtransfer.services.trainer.softlabels import (SOFT_COLUMNS, SoftLabelError, build_soft_labels, content_hash,
                                             export_soft_labels, read_soft_labels)

    scenarios = [_scenario(i) for i in IDS[:3]] + [_scenario("pgg")]
    exact = {i: {"p_C": p, "p_D": 1 - p} for i, p in zip(IDS, P_C)}
    df, dropped = build_soft_labels(scenarios, None, exact, instruction="answer_only",
                                    teacher_instruction="answer_motivation")
    assert dropped == ["pgg"]  # no exact row and no sample: no target
    assert list(df.columns) == list(SOFT_COLUMNS) and len(df) == 3
    ex = export_soft_labels(df, tmp_path / "set", name="t", teacher="synthetic", instruction="answer_only",
                            teacher_instruction="answer_motivation", dropped=dropped)
    assert ex.content_hash == content_hash(pd.read_parquet(ex.parquet)) and len(ex.mlflow_digest) == 32
    card = ex.card.read_text()
    assert "pgg" in card and "answer_only" in card and ex.content_hash in card
    rows = read_soft_labels(tmp_path / "set")
    assert [r["scenario_id"] for r in rows] == sorted(IDS[:3])
    assert rows[0]["messages"][-1]["role"] == "user" and rows[0]["actions"] == ["C", "D"]
    with pytest.raises(SoftLabelError, match="empty"):
        export_soft_labels(df.iloc[:0], tmp_path / "empty", name="t", teacher="x", instruction="answer_only",
                           teacher_instruction="answer_motivation")
    assert not (tmp_path / "empty").exists()


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def student():
    from tests.fixtures.tiny_models import tiny_model_dir

    return tiny_model_dir("llama", seed=1)


def _soft_set(out, probs_c, ids=IDS):
    from tomtransfer.services.trainer.softlabels import build_soft_labels, export_soft_labels

    exact = {i: {"p_C": 0.9 * p, "p_D": 0.9 * (1 - p)} for i, p in zip(ids, probs_c)}  # 10 % invalid mass
    df, _ = build_soft_labels([_scenario(i) for i in ids], None, exact, instruction="answer_only",
                              teacher_instruction="answer_motivation")
    return export_soft_labels(df, out, name="synthetic", teacher="synthetic", instruction="answer_only",
                              teacher_instruction="answer_motivation").parquet


def _student_q(student, adapter, soft):
    import transformers

    from tomtransfer.services.trainer.distill import encode_soft_label, student_distributions
    from tomtransfer.services.trainer.softlabels import read_soft_labels
    from tomtransfer.services.trainer.train import _render

    tok = transformers.AutoTokenizer.from_pretrained(str(student))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(student))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    rows = [encode_soft_label(tok, r, 2048, _render) for r in read_soft_labels(soft)]
    return {r["scenario_id"]: q for r, q in zip(rows, student_distributions(model, rows, tok.pad_token_id,
                                                                            torch.device("cpu")))}


def _score(q: dict, truth: dict) -> tuple[float, float]:
    from scipy.stats import spearmanr

    from tomtransfer.services.trainer.distill import kl

    ids = sorted(truth)
    return (float(np.mean([kl(truth[i], q[i]) for i in ids])),
            float(spearmanr([truth[i][0] for i in ids], [q[i][0] for i in ids]).statistic))


def _loop_config(student, soft, out, **training):
    return {"dataset_path": "/nonexistent", "soft_labels_path": str(soft), "student_path": str(student),
            "num_threads": 1, "output_dir": str(out), "probe_examples": 0,
            "training": {"objective": "distribution", "epochs": 20, "effective_batch_size": 8,
                         "per_device_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                         "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]},
                         **training}}


@pytest.mark.slow  # ~40 s of CPU: two runs of 20 steps over 8 real scenario prompts (~600 tokens each)
def test_distribution_objective_moves_the_student_toward_the_teacher(student, tmp_path):
    from tomtransfer.services.trainer.train import train_loop_per_worker

    true_set = _soft_set(tmp_path / "true", P_C)
    shuffled_set = _soft_set(tmp_path / "shuffled", [P_C[j] for j in SHUFFLE])
    truth = {i: [0.9 * p / 0.9, 0.9 * (1 - p) / 0.9] for i, p in zip(IDS, P_C)}
    kl0, rho0 = _score(_student_q(student, None, true_set), truth)

    res = train_loop_per_worker(_loop_config(student, true_set, tmp_path / "a"))
    kl1, rho1 = _score(_student_q(student, tmp_path / "a" / "adapter", true_set), truth)
    res_s = train_loop_per_worker(_loop_config(student, shuffled_set, tmp_path / "b"))
    kl2, rho2 = _score(_student_q(student, tmp_path / "b" / "adapter", true_set), truth)
    print(f"\nbase: KL {kl0:.4f} rho {rho0:.2f}; true targets: KL {kl1:.4f} rho {rho1:.2f} (loss "
          f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}); shuffled targets: KL to the truth {kl2:.4f} rho "
          f"{rho2:.2f}")
    assert res["objective"] == "distribution" and res["examples"] == len(IDS)
    assert res["loss_last"] < 0.25 * res["loss_first"]
    assert kl1 < 0.25 * kl0 and rho1 > 0.8
    assert kl2 > 0.5 * kl0 and kl2 > 5 * kl1 and rho2 < 0.5  # learning the wrong mapping is not transfer


def test_sft_plus_distribution_logs_both_and_resumes_exactly(student, tmp_path):
    from tomtransfer.services.trainer.dataset import export_training_set
    from tomtransfer.services.trainer.train import train_loop_per_worker
    from tests.fixtures.synthetic_samples import fake_samples

    data = export_training_set(fake_samples(IDS[:2], n=2, c_rate=0.5, invalid_rate=0.0, seed=3), tmp_path / "ds",
                               targets="answer").parquet
    soft = _soft_set(tmp_path / "soft", P_C[:2], IDS[:2])

    def cfg(out, **over):
        c = _loop_config(student, soft, out, objective="sft+distribution", distribution_weight=0.7, epochs=1,
                         effective_batch_size=2, per_device_batch_size=2)
        c["dataset_path"] = str(data)
        return {**c, **over}

    full = train_loop_per_worker(cfg(tmp_path / "full"))
    assert full["step"] == 2 and full["objective"] == "sft+distribution"
    assert {"loss_sft", "loss_distribution"} <= set(full)
    assert full["loss"] == pytest.approx(0.3 * full["loss_sft"] + 0.7 * full["loss_distribution"])
    with pytest.raises(RuntimeError, match="injected fault at step 1"):
        train_loop_per_worker(cfg(tmp_path / "cut", checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_steps=1,
                                  fault={"at_step": 1, "rank": 0, "marker": str(tmp_path / "fired")}))
    resumed = train_loop_per_worker(cfg(tmp_path / "cut", resume_from=str(tmp_path / "ckpt")))
    assert resumed["start_step"] == 1 and resumed["step"] == 2
    assert resumed["adapter_checksums"] == full["adapter_checksums"]


# ------------------------------------------------------------------------------------------------ bad input
def _write_config(tmp_path, student, **training) -> Path:
    import yaml

    cfg = {"name": "obj", "output_dir": str(tmp_path / "runs"),
           "models": {"teacher": {"model": str(student), "engine": "transformers"},
                      "student": {"model": str(student), "engine": "transformers"}},
           "generate": {"samples": 2, "families": ["in_sample"]},
           "scenarios": {"ids": IDS[:2]},
           "training": training}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(capsys, *args) -> tuple[int, str]:
    """The `tomtransfer` command in this process: (exit status, stderr)."""
    import signal

    from tomtransfer.services.cli import main

    capsys.readouterr()
    argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["tomtransfer", *args]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("weight", [0.0, 1.0, 1.5])
def test_weight_outside_0_1_is_refused(weight, tmp_path):
    from pydantic import ValidationError

    from tomtransfer.shared.config import TrainingConfig

    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        TrainingConfig(objective="sft+distribution", distribution_weight=weight)
    assert TrainingConfig().objective == "sft"


def test_bad_objective_input_one_line_exit_2_nothing_written(student, tmp_path, capsys):
    from tomtransfer.services.trainer.softlabels import build_soft_labels

    bad = _write_config(tmp_path, student, objective="sft+distribution", distribution_weight=1.0)
    code, err = _cli(capsys, "config", "validate", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "distribution_weight" in err, err

    # an action string that tokenizes to nothing
    df, _ = build_soft_labels([_scenario(IDS[0])], None, {IDS[0]: {"p_C": 0.5, "p_D": 0.5}},
                              instruction="answer_only", teacher_instruction="answer_motivation")
    df["actions"] = json.dumps(["C", ""])
    (tmp_path / "blank").mkdir()
    df.to_parquet(tmp_path / "blank" / "soft_labels.parquet")
    # an empty set
    (tmp_path / "empty").mkdir()
    df.iloc[:0].to_parquet(tmp_path / "empty" / "soft_labels.parquet")
    for name, needle in (("blank", "tokenizes to nothing"), ("empty", "empty")):
        cfg = _write_config(tmp_path, student, objective="distribution", soft_labels=str(tmp_path / name))
        code, err = _cli(capsys, "train", "--config", str(cfg))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
        assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ fingerprints
def test_train_key_follows_the_objective(student, tmp_path):
    from tomtransfer.services.common.fingerprint import train_key
    from tomtransfer.services.pipeline.fingerprint import train_soft_labels_key
    from tomtransfer.shared.config import load_config

    data = tmp_path / "train.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(data)

    def key(**training):
        cfg = load_config(_write_config(tmp_path, student, **training))
        return train_key(cfg, data, soft_labels_key=train_soft_labels_key(cfg))

    sft = key()
    assert key(distribution_weight=0.3) == sft  # the new knobs do not touch an sft key
    dist = key(objective="distribution")
    assert dist != sft and key(objective="distribution", distribution_weight=0.3) == dist
    mixed = key(objective="sft+distribution")
    assert mixed not in (sft, dist) and key(objective="sft+distribution", distribution_weight=0.3) != mixed
    soft = _soft_set(tmp_path / "soft", P_C)
    assert key(objective="distribution", soft_labels=str(soft)) != dist


def test_distribution_epoch_visits_every_scenario_once(student, tmp_path):
    """The distribution objective's unit is a scenario: with more scenarios than one effective batch, an epoch is
    ceil(scenarios / effective batch) optimizer steps over all of them (it once stayed on the first batch: the
    epoch's position counted only SFT micro-batches), and the run ends at epoch 1.0, not inside epoch 0."""
    from tomtransfer.services.trainer.train import train_loop_per_worker

    soft = _soft_set(tmp_path / "true", P_C)
    res = train_loop_per_worker(_loop_config(student, soft, tmp_path / "a", epochs=1, effective_batch_size=2,
                                             per_device_batch_size=1, learning_rate=1e-4))
    assert res["total_steps"] == res["step"] == len(IDS) // 2
    assert res["epoch"] == pytest.approx(1.0)

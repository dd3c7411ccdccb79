"""Stage fingerprints: which knob feeds which stage (a changed input reruns exactly the stages it feeds)."""

from __future__ import annotations

import pytest

from tomtransfer.shared.config import parse_config

from tomtransfer.services.evaluator.collect import role_dir, role_spec
from tomtransfer.services.common.fingerprint import dir_sha256, generate_key, train_key, weights_identity

BASE = {"name": "fp", "models": {"teacher": {"model": "hub/teacher"}, "student": {"model": "hub/student"}}}
IDS = ["IR_prison", "IR_staghunt"]


def cfg(**sections):
    data = {**BASE}
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})
        data[section] = {**data[section], key: value}
    return parse_config(data)


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "train.parquet"
    p.write_bytes(b"one training set")
    return p


@pytest.mark.parametrize("knob, value", [
    ("sampling__temperature", 0.5), ("sampling__max_tokens", 99), ("sampling__seed", 1),
    ("generate__samples", 7), ("generate__instruction", "answer_only"), ("generate__targets", "answer"),
])
def test_generate_key_follows_its_inputs(knob, value):
    assert generate_key(cfg(**{knob: value}), IDS) != generate_key(cfg(), IDS)


@pytest.mark.parametrize("knob, value", [
    ("generate__concurrency", 3), ("training__learning_rate", 1e-3), ("evaluate__samples", 9),
    ("serving__port", 9000), ("mlflow__experiment", "other"),
])
def test_generate_key_ignores_what_it_does_not_read(knob, value):
    assert generate_key(cfg(**{knob: value}), IDS) == generate_key(cfg(), IDS)


def test_generate_key_follows_the_teacher_and_the_scenarios():
    other = parse_config({**BASE, "models": {**BASE["models"], "teacher": {"model": "hub/other"}}})
    assert generate_key(other, IDS) != generate_key(cfg(), IDS)
    assert generate_key(cfg(), IDS[:1]) != generate_key(cfg(), IDS)


def test_train_key_follows_data_student_and_settings(dataset, tmp_path):
    base = train_key(cfg(), dataset)
    assert train_key(cfg(training__learning_rate=1e-3), dataset) != base
    assert train_key(cfg(training__epochs=2), dataset) != base
    other = tmp_path / "other.parquet"
    other.write_bytes(b"another training set")
    assert train_key(cfg(), other) != base
    student = parse_config({**BASE, "models": {**BASE["models"], "student": {"model": "hub/s2"}}})
    assert train_key(student, dataset) != base
    # scheduling knobs do not change the adapter
    for knob, value in (("training__max_failures", 5), ("training__cpus_per_worker", 2.0),
                        ("training__checkpoint_every_steps", 3), ("evaluate__samples", 9)):
        assert train_key(cfg(**{knob: value}), dataset) == base, knob
    # the base's dtype: auto's choice keeps the key it had before the knob (fp32 on CPU, bf16 on GPU)
    assert train_key(cfg(training__dtype="float32"), dataset) == base
    assert train_key(cfg(training__dtype="bfloat16"), dataset) != base
    gpu = train_key(cfg(training__use_gpu=True), dataset)
    assert train_key(cfg(training__use_gpu=True, training__dtype="bfloat16"), dataset) == gpu
    assert train_key(cfg(training__use_gpu=True, training__dtype="float32"), dataset) != gpu


def test_each_role_store_follows_its_own_inputs(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"weights 1")
    first = {"sha256": dir_sha256(a)}
    (a / "adapter_model.safetensors").write_bytes(b"weights 2")
    second = {"sha256": dir_sha256(a)}
    c = cfg(evaluate__estimator="exact")
    assert role_dir(c, "student_finetuned", first) != role_dir(c, "student_finetuned", second)
    for role in ("teacher", "student_base"):
        assert role_dir(c, role, first) == role_dir(c, role, second)
    # the prompt and the estimator are part of a role's key
    assert role_dir(cfg(evaluate__protocol="answer_only"), "teacher") != role_dir(cfg(), "teacher")
    assert role_dir(cfg(evaluate__estimator="exact"), "student_base") != role_dir(cfg(), "student_base")
    # the sample count is not: a store grows to a larger N
    assert role_dir(cfg(evaluate__samples=9), "teacher") == role_dir(cfg(), "teacher")
    assert role_spec(c, "teacher")["instruction"] == "answer_motivation"


def test_placebo_switch_keeps_the_real_adapter_and_the_placebo_has_its_own_key(dataset, tmp_path):
    from tomtransfer.services.pipeline.stages import placebo_config

    base = train_key(cfg(), dataset)
    on = cfg(training__placebo=True)
    assert train_key(on, dataset) == base  # turning the placebo on reuses the real adapter
    assert train_key(placebo_config(on), dataset) == base  # the adapter's name is not part of the key
    assert train_key(on, dataset, placebo=True) != base  # the placebo's own key, even on the same bytes
    # the placebo role's store follows its own adapter, the fine-tuned one its own
    a, b = {"sha256": "1"}, {"sha256": "2"}
    c = cfg(training__placebo=True, evaluate__estimator="exact")
    assert role_dir(c, "student_placebo", a) != role_dir(c, "student_placebo", b)
    assert role_dir(c, "student_placebo", a) != role_dir(c, "student_finetuned", a)
    assert role_spec(c, "student_placebo", a)["served"] == "student:tom-placebo"


def test_evaluate_key_follows_the_placebo_and_teacher_lead_switches():
    from tomtransfer.services.evaluator.collect import lead_dir, store_dirs
    from tomtransfer.services.pipeline.fingerprint import evaluate_key

    exact = cfg(evaluate__estimator="exact")
    assert exact.evaluate.teacher_lead_on and not cfg().evaluate.teacher_lead_on  # default: on with exact
    keys = {evaluate_key(c) for c in (cfg(), exact, cfg(evaluate__estimator="exact", evaluate__teacher_lead=False),
                                      cfg(evaluate__estimator="exact", training__placebo=True),
                                      cfg(training__placebo=True), cfg(evaluate__teacher_lead=True))}
    assert len(keys) == 6
    assert evaluate_key(exact) == evaluate_key(cfg(evaluate__estimator="exact", evaluate__concurrency=3))
    assert set(store_dirs(exact)) == {"teacher", "student_base", "student_finetuned", "teacher_lead"}
    assert set(store_dirs(cfg(training__placebo=True))) == {"teacher", "student_base", "student_finetuned",
                                                           "student_placebo"}
    # the lead rows' store: the teacher's weights and evaluation prompt, not the sampling settings of its samples
    assert lead_dir(exact) != lead_dir(cfg(evaluate__estimator="exact", evaluate__protocol="answer_only"))
    assert lead_dir(exact) == lead_dir(cfg(evaluate__estimator="exact", sampling__max_tokens=99))
    assert lead_dir(exact).name.startswith("teacher_lead-")


def test_local_weights_are_identified_by_content(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    one = weights_identity(str(d))
    (d / "config.json").write_text('{"hidden": 8}')
    assert weights_identity(str(d)) != one and weights_identity("hub/x") == {"hub_id": "hub/x"}


def test_a_weights_file_is_read_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """The weights' identity is asked for once per stage and role; a 7B folder is 13.5 GB, so an unchanged file is
    hashed once, and a changed one (size or mtime) is hashed again."""
    import builtins
    import os

    d = tmp_path / "model"
    d.mkdir()
    f = d / "model.safetensors"
    f.write_bytes(b"a" * 4096)
    first = weights_identity(str(d))
    real_open, opened = builtins.open, []

    def counting_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert weights_identity(str(d)) == first and weights_identity(str(d)) == first
    assert str(f) not in opened  # unchanged: not read again
    f.write_bytes(b"b" * 4096)  # same size, new content and mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse-mtime filesystem still sees a change
    assert weights_identity(str(d)) != first and opened.count(str(f)) == 1

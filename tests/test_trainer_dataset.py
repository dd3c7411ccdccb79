"""Training-set building and exports (services.trainer.dataset), and the loop's tokenization/masking."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from tomtransfer.services.trainer.dataset import (
    DatasetError,
    DatasetExport,
    build_training_set,
    content_hash,
    export_placebo_set,
    export_training_set,
    load_samples,
    log_dataset_to_mlflow,
    read_training_set,
    scenario_derangement,
)
from tests.fixtures.synthetic_samples import fake_samples

pytest_plugins = ["tests.fixtures.mlflow_server"]

IDS = ["IR_prison", "biz_staghunt", "team_snowdrift", "pgg"]


@pytest.fixture(scope="module")
def samples() -> pd.DataFrame:
    return fake_samples(IDS, n=20, c_rate={"IR_prison": 0.9, "biz_staghunt": 0.25, "team_snowdrift": 0.5},
                        invalid_rate=0.15, seed=3)


def test_answer_targets_are_the_parsed_answer(samples):
    train = build_training_set(samples, targets="answer", valid_policy="valid_only")
    assert len(train) == int(samples["valid"].sum())
    assert set(train[train.scenario_id != "pgg"].target) <= {"C", "D"}
    assert all(t.isdigit() for t in train[train.scenario_id == "pgg"].target)
    assert (train.target == train.answer).all()


def test_answer_motivation_targets_are_the_response_verbatim(samples):
    train = build_training_set(samples, targets="answer_motivation", valid_policy="valid_only")
    by_key = samples.set_index(["scenario_id", "sample_index"])["response"]
    assert all(by_key[(r.scenario_id, r.sample_index)] == r.target for r in train.itertuples())
    msgs = json.loads(train.iloc[0].messages)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert train.iloc[0].system == msgs[0]["content"] and train.iloc[0].user == msgs[1]["content"]


def test_valid_policy(samples):
    n, n_valid = len(samples), int(samples["valid"].sum())
    assert 0 < n_valid < n
    assert len(build_training_set(samples, valid_policy="valid_only")) == n_valid
    every = build_training_set(samples, valid_policy="all")
    assert len(every) == n and (~every.valid).sum() == n - n_valid
    # answer-only targets need an answer: invalid samples have none, whatever the policy
    assert len(build_training_set(samples, targets="answer", valid_policy="all")) == n_valid


def test_duplicates_and_missing_columns_are_refused(samples, tmp_path):
    with pytest.raises(DatasetError, match="duplicate"):
        build_training_set(pd.concat([samples, samples.iloc[:1]]))
    samples.drop(columns=["valid"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match="valid"):
        load_samples(tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match="not found"):
        load_samples(tmp_path / "nope")


def test_exports_shapes_and_card(samples, tmp_path):
    ex = export_training_set(samples, tmp_path / "ds", name="tomtest", targets="answer_motivation")
    train = pd.read_parquet(ex.parquet)
    assert len(train) == ex.examples == int(samples.valid.sum())

    alpaca = json.loads(ex.alpaca.read_text())
    sharegpt = json.loads(ex.sharegpt.read_text())
    assert len(alpaca) == len(sharegpt) == ex.examples
    assert set(alpaca[0]) == {"instruction", "input", "output", "system"}
    assert alpaca[0]["output"] == train.target[0] and alpaca[0]["system"] == train.system[0]
    assert alpaca[0]["instruction"] == train.user[0] and alpaca[0]["input"] == ""
    conv = sharegpt[0]["conversations"]
    assert [c["from"] for c in conv] == ["human", "gpt"]
    assert conv[0]["value"] == train.user[0] and conv[1]["value"] == train.target[0]
    assert sharegpt[0]["system"] == train.system[0]

    info = json.loads(ex.dataset_info.read_text())
    assert set(info) == {"tomtest_alpaca", "tomtest_sharegpt"}
    assert info["tomtest_alpaca"]["formatting"] == "alpaca"
    assert info["tomtest_sharegpt"]["formatting"] == "sharegpt"
    assert info["tomtest_sharegpt"]["columns"]["messages"] == "conversations"
    for entry in info.values():
        assert (ex.out_dir / entry["file_name"]).is_file()

    # card: counts, invalid rate and C-rate per scenario, computed independently here
    card = ex.card.read_text()
    assert ex.content_hash in card and "fake-teacher" in card
    stats = {s["scenario_id"]: s for s in ex.scenarios}
    assert set(stats) == set(IDS)
    for sid, g in samples.groupby("scenario_id"):
        s = stats[sid]
        valid = g[g.valid]
        assert s["samples"] == len(g) == 20 and s["valid"] == len(valid)
        assert s["invalid_rate"] == pytest.approx(1 - len(valid) / len(g))
        assert s["examples"] == int((train.scenario_id == sid).sum())
        row = next(line for line in card.splitlines() if line.startswith(f"| `{sid}` "))
        assert f"| {len(g)} | {len(valid)} |" in row
        if sid == "pgg":
            assert s["c_rate"] is None
            assert s["mean_contribution"] == pytest.approx(valid.answer.astype(int).mean())
        else:
            c_rate = (valid.answer == "C").mean()
            assert s["c_rate"] == pytest.approx(c_rate)
            assert f"{100 * c_rate:.1f}%" in row
    assert f"{ex.samples} samples read, {ex.invalid} invalid, {ex.examples} training examples" in card
    meta = json.loads(ex.meta.read_text())
    assert meta["content_hash"] == ex.content_hash and meta["examples"] == ex.examples


def test_content_hash_is_stable(samples, tmp_path):
    a = export_training_set(samples, tmp_path / "a", targets="answer")
    shuffled = samples.sample(frac=1.0, random_state=7).reset_index(drop=True)
    b = export_training_set(shuffled, tmp_path / "b", targets="answer")
    assert a.content_hash == b.content_hash  # row order of the samples does not matter
    assert content_hash(pd.read_parquet(a.parquet)) == a.content_hash  # the file round-trips to the same hash
    assert a.parquet.read_bytes() == b.parquet.read_bytes()
    c = export_training_set(samples, tmp_path / "c", targets="answer_motivation")
    assert c.content_hash != a.content_hash
    changed = samples.copy()
    changed.loc[changed.index[0], "response"] += " (edited)"
    d = export_training_set(changed, tmp_path / "d", targets="answer_motivation")
    assert d.content_hash != c.content_hash
    assert len(a.content_hash) == 64 and a.mlflow_digest == a.content_hash[:32]


def test_samples_from_a_folder_of_parts(samples, tmp_path):
    parts = tmp_path / "samples"
    parts.mkdir()
    for sid, g in samples.groupby("scenario_id"):
        g.to_parquet(parts / f"{sid}.parquet", index=False)
    ex = export_training_set(parts, tmp_path / "ds", targets="answer")
    assert ex.samples == len(samples)
    rows = read_training_set(ex.out_dir)
    assert len(rows) == ex.examples and rows[0]["messages"][0]["role"] == "system"



def test_placebo_set_is_a_permutation_across_scenarios(samples, tmp_path):
    """The placebo control's training set: the same completions (answer and motivation together), prompts where they
    were, the same C share, and (almost) every completion at another scenario's prompt; 2x2 and PGG completions
    stay among their own kind; seeded (same seed: same set, other seed: another permutation)."""
    real = export_training_set(samples, tmp_path / "real", name="t", targets="answer_motivation")
    ex = export_placebo_set(real.parquet, tmp_path / "placebo", seed=5, name="t")
    a, b = pd.read_parquet(real.parquet), pd.read_parquet(ex.parquet)
    assert len(a) == len(b) and (a.example_id == b.example_id).all()
    for col in ("scenario_id", "system", "user", "messages", "family", "sample_index"):  # prompts kept in place
        assert (a[col] == b[col]).all(), col
    assert sorted(a.target) == sorted(b.target)  # the same multiset of completions
    assert sorted(zip(a.target, a.answer.astype(str))) == sorted(zip(b.target, b.answer.astype(str)))  # whole
    letters = lambda df: df.answer[df.answer.isin(["C", "D"])]  # noqa: E731
    assert (letters(a) == "C").mean() == pytest.approx((letters(b) == "C").mean())  # the same overall C share
    by_id = a.set_index("example_id")
    assert (by_id.loc[b.source_example_id, "target"].to_numpy() == b.target.to_numpy()).all()  # origin recorded
    # 3 2x2 scenarios, none holding half of their examples: every 2x2 completion moves to another scenario; the
    # PGG's completions stay among themselves (the one PGG scenario: they cannot move)
    pgg = b.scenario_id == "pgg"
    assert (b.source_scenario_id[~pgg] != b.scenario_id[~pgg]).all() and (b.source_scenario_id[pgg] == "pgg").all()
    assert ex.placebo["moved"] == int((~pgg).sum()) > 0 and ex.placebo["stayed"] == int(pgg.sum()) > 0
    # the scenario -> choice mapping is gone: the real set's C share per scenario ranges 0.25..0.9, the placebo's not
    spread = lambda df: df[~(df.scenario_id == "pgg")].groupby("scenario_id").answer.apply(  # noqa: E731
        lambda s: (s == "C").mean())
    assert spread(b).max() - spread(b).min() < spread(a).max() - spread(a).min()
    assert ex.placebo["seed"] == 5 and ex.placebo["source_content_sha256"] == real.content_hash
    assert ex.name == "t-placebo" and ex.content_hash != real.content_hash
    card = ex.card.read_text()
    assert "Placebo control" in card and "seed 5" in card and real.content_hash in card
    assert DatasetExport.from_dir(ex.out_dir).placebo["seed"] == 5
    again = export_placebo_set(real.parquet, tmp_path / "again", seed=5, name="t")
    assert again.parquet.read_bytes() == ex.parquet.read_bytes()
    other = export_placebo_set(real.parquet, tmp_path / "other", seed=6, name="t")
    assert other.content_hash != ex.content_hash


def test_placebo_derangement_where_possible():
    import numpy as np

    labels = ["a"] * 6 + ["b"] * 2 + ["c"] * 1  # "a" holds more than half: 3 of its prompts must keep an "a"
    src = scenario_derangement(labels, np.random.default_rng(0))
    assert sorted(src) == list(range(9))
    assert sum(labels[s] == labels[i] for i, s in enumerate(src)) == 3


# ------------------------------------------------------------------------ tokenization and masking
@pytest.fixture(scope="module")
def tokenizer():
    from tests.fixtures.tiny_models import train_tokenizer

    return train_tokenizer()


def test_loss_mask_covers_only_the_assistant_turn(tokenizer, samples):
    from tomtransfer.services.trainer.train import IGNORE_INDEX, encode_example

    msgs = json.loads(samples.messages[0])
    ex = encode_example(tokenizer, msgs, "C", max_len=4096)
    prompt_ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == list(prompt_ids)
    assert all(label == IGNORE_INDEX for label in ex["labels"][:n])
    target = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert target == ex["input_ids"][n:]
    assert tokenizer.decode(target) == "C<|im_end|>\n"  # the answer and the template's end of turn
    # too long a prompt: dropped; a long answer: truncated to max_len
    assert encode_example(tokenizer, msgs, "C", max_len=n) is None
    long = encode_example(tokenizer, msgs, "C " * 200, max_len=n + 5)
    assert len(long["input_ids"]) == n + 5


def test_template_without_system_role_merges_it(tokenizer, samples):
    from tomtransfer.services.trainer.train import encode_example

    tok = copy.deepcopy(tokenizer)  # keep the module fixture untouched
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    msgs = json.loads(samples.messages[0])
    ex = encode_example(tok, msgs, "D", max_len=4096)
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>user\n" + msgs[0]["content"])


# ------------------------------------------------------------------------------------ MLflow input
@pytest.mark.netns
def test_dataset_logged_to_mlflow(samples, tmp_path, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    ex = export_training_set(samples, tmp_path / "ds", name="tomtest", targets="answer")
    client = MlflowClient(mlflow_tracking_uri)
    exp = client.create_experiment("dataset-test")
    run_id = client.create_run(exp).info.run_id
    assert log_dataset_to_mlflow(ex, run_id=run_id, tracking_uri=mlflow_tracking_uri) == run_id
    run = client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "tomtest" and inp.dataset.digest == ex.content_hash[:32]
    schema = json.loads(inp.dataset.schema)["mlflow_colspec"]
    assert {c["name"] for c in schema} >= {"messages", "target", "scenario_id"}
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "training" and tags["content_sha256"] == ex.content_hash
    files = {f.path for f in client.list_artifacts(run_id, "dataset")}
    assert {"dataset/DATASET_CARD.md", "dataset/train.parquet", "dataset/train_alpaca.json",
            "dataset/train_sharegpt.json", "dataset/dataset_info.json"} <= files

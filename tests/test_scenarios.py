"""The 53-scenario catalog, scenario packs and the importer of the paper's repository layout."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from tomtransfer.shared.errors import UserError
from tomtransfer.shared.lfb import read_lfb
from tomtransfer.shared.packs import dump_pack, load_pack, pack_from_data
from tomtransfer.shared.scenarios import CANONICAL_CONTEXTS, GAME_IDS, OOS_CONTEXTS, build_catalog, default_catalog

LFB = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lfb"


def test_catalog_has_53_scenarios_by_family():
    cat = default_catalog()
    assert len(cat.scenarios) == 53
    assert Counter(s.family for s in cat.scenarios.values()) == {
        "in_sample": 20, "oos_context": 12, "oos_game": 20, "pgg": 1,
    }
    assert {f"{c}_{g}" for c in CANONICAL_CONTEXTS for g in GAME_IDS} == {
        s.id for s in cat.scenarios.values() if s.family == "in_sample"
    }
    assert {f"{c}_{g}" for c in OOS_CONTEXTS for g in GAME_IDS} == {
        s.id for s in cat.scenarios.values() if s.family == "oos_context"
    }
    x2 = [s for s in cat.scenarios.values() if s.family == "oos_game"]
    assert all(s.id == f"{s.context.id}_{s.game_id}_x2" and s.payoff_scale == 2 for s in x2)
    assert cat.scenarios["pgg"].is_pgg


def test_doubled_scenarios_double_every_payoff():
    cat = default_catalog()
    for s in cat.scenarios.values():
        if s.family == "oos_game":
            base = cat.scenarios[s.id.removesuffix("_x2")]
            assert s.game.payoffs == {o: (2 * a, 2 * b) for o, (a, b) in base.game.payoffs.items()}


def test_contexts_are_own_words_and_not_empty():
    cat = default_catalog()
    for cid in CANONICAL_CONTEXTS + OOS_CONTEXTS:
        text = cat.contexts[cid].text
        assert len(text.split()) > 100 and "coplayer" in text
        original = (LFB / "data" / "context" / f"{cid}.txt")
        if original.exists():
            assert text.strip() != original.read_text().strip()
    assert "2.5" in cat.contexts["dormparty"].text and "$10" in cat.contexts["dormparty"].text


PACK = {
    "contexts": [{"id": "hospital", "text": "You run a hospital ward; the other ward head is your coplayer."}],
    "games": [{"id": "chicken", "payoffs": {"CC": [5, 5], "CD": [3, 10], "DC": [10, 3], "DD": [0, 0]}}],
    "scenarios": [
        {"context": "hospital", "game": "prison", "family": "oos_context"},
        {"context": "IR", "game": "chicken", "family": "oos_game", "scale": 2},
    ],
}


def test_pack_adds_scenarios(tmp_path):
    p = tmp_path / "pack.yaml"
    p.write_text(yaml.safe_dump(PACK))
    cat = build_catalog([p])
    assert len(cat.scenarios) == 55
    assert cat.scenarios["hospital_prison"].family == "oos_context"
    assert cat.scenarios["IR_chicken_x2"].game.payoffs[("D", "C")] == (20, 6)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["scenarios"].append({"context": "nowhere", "game": "prison", "family": "oos_context"}), "unknown context 'nowhere'"),
        (lambda d: d["scenarios"].append({"context": "IR", "game": "nogame", "family": "oos_game"}), "unknown game 'nogame'"),
        (lambda d: d["games"][0]["payoffs"].pop("DD"), "missing outcome"),
        (lambda d: d["games"][0]["payoffs"].update(CD=[3, 9]), "not symmetric"),
        (lambda d: d["scenarios"][0].update(family="space"), "family"),
        (lambda d: d["contexts"].append({"id": "IR", "text": "dup"}), "already defined: IR"),
        (lambda d: d["contexts"][0].update(colour="red"), "colour"),
        (lambda d: d["scenarios"].append(dict(d["scenarios"][0])), "duplicate scenario id"),
    ],
)
def test_bad_packs_give_one_line_errors(mutate, message):
    import copy

    data = copy.deepcopy(PACK)
    mutate(data)
    with pytest.raises(UserError) as e:
        pack_from_data(data, "pack.yaml", default_catalog())
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("pack.yaml")


def test_missing_pack_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pack(tmp_path / "nope.yaml", default_catalog())


def test_import_lfb_keeps_texts_byte_identical(tmp_path):
    contexts, games, scenarios = read_lfb(LFB, prefix="lfb_")
    out = tmp_path / "lfb.yaml"
    out.write_text(dump_pack(contexts, games, scenarios))
    pack = load_pack(out, base=default_catalog())
    files = list((LFB / "data" / "context").glob("*.txt")) + list((LFB / "new contexts").glob("*.txt"))
    assert len(files) == 9
    for f in files:
        assert pack.contexts["lfb_" + f.stem].text.encode() == f.read_bytes(), f
    for f in (LFB / "data" / "game").glob("*.txt"):
        assert pack.games["lfb_" + f.stem].text.encode() == f.read_bytes(), f
    # 6 canonical contexts (incl. the empty no-context control) x 4 games, the same doubled, 3 new x 4
    fams = Counter(s.family for s in pack.scenarios.values())
    assert fams == {"in_sample": 24, "oos_game": 24, "oos_context": 12}
    assert pack.games["lfb_prison"].payoffs[("C", "D")] == (2, 10)  # read back from the text
    assert "earn 20 points" in pack.scenarios["lfb_team_prison_x2"].game.text


def test_import_lfb_rejects_other_layouts(tmp_path):
    with pytest.raises(UserError, match="not the paper's layout"):
        read_lfb(tmp_path)

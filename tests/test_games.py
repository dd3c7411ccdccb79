"""Game analysis is computed from payoffs: each catalog game's label must follow from its matrix."""

import pytest

from tomtransfer.shared.games import (
    CANONICAL_PAYOFFS, Game, PublicGoodsGame, analyze, canonical_games, parse_payoff_text,
)

EXPECTED = {
    # game: (dilemma class, pure Nash equilibria, Pareto-optimal outcomes, dominant action)
    "prison": ("prisoners_dilemma", {("D", "D")}, {("C", "C"), ("C", "D"), ("D", "C")}, "D"),
    "staghunt": ("stag_hunt", {("C", "C"), ("D", "D")}, {("C", "C")}, None),
    "snowdrift": ("snowdrift", {("C", "D"), ("D", "C")}, {("C", "C"), ("C", "D"), ("D", "C")}, None),
    "delight": ("harmony", {("C", "C")}, {("C", "C")}, "C"),
}


@pytest.mark.parametrize("scale", [1, 2, 0.5, 7])
@pytest.mark.parametrize("gid", sorted(EXPECTED))
def test_catalog_labels_follow_from_payoffs(gid, scale):
    game = canonical_games()[gid]
    game = game if scale == 1 else game.scaled(scale)
    a = analyze(game)
    dilemma, nash, pareto, dominant = EXPECTED[gid]
    assert a.dilemma == dilemma
    assert set(a.pure_nash) == nash
    assert set(a.pareto_optimal) == pareto
    assert a.dominant_action == dominant
    assert a.is_social_dilemma == (gid != "delight")


def test_paper_payoff_values():
    g = canonical_games()
    assert g["prison"].payoffs[("C", "D")] == (2, 10)
    assert g["staghunt"].payoffs[("C", "C")] == (10, 10)
    assert g["snowdrift"].payoffs[("D", "D")] == (2, 2)
    assert g["delight"].payoffs[("D", "C")] == (5, 3)


def test_doubled_game_text_comes_from_the_matrix():
    pd = canonical_games()["prison"]
    x2 = pd.scaled(2)
    assert x2.id == "prison_x2"
    text = x2.render()
    assert "you will both earn 10 points" in text and "you will earn 20 points and your coplayer will earn 4 points" in text
    assert parse_payoff_text(text) == {o: (2 * a, 2 * b) for o, (a, b) in CANONICAL_PAYOFFS["prison"].items()}
    assert parse_payoff_text(pd.render()) == pd.payoffs


def test_verbatim_text_scales_only_point_numbers():
    g = Game(id="g", payoffs=CANONICAL_PAYOFFS["prison"], text=canonical_games()["prison"].render("Step 2 of 3."))
    t = g.scaled(2).text
    assert "Step 2 of 3." in t and "earn 20 points" in t


def test_relabelled_matrix_is_not_mislabelled():
    # Swap T and R of the PD: now cooperation dominates -> not a prisoner's dilemma any more.
    p = dict(CANONICAL_PAYOFFS["prison"])
    p[("C", "C")], p[("D", "C")], p[("C", "D")] = (10, 10), (5, 2), (2, 5)
    assert analyze(Game("x", p)).dilemma == "stag_hunt"


def test_asymmetric_or_incomplete_games_are_rejected():
    p = dict(CANONICAL_PAYOFFS["prison"])
    p[("C", "D")] = (2, 9)
    with pytest.raises(ValueError, match="not symmetric"):
        Game("bad", p)
    with pytest.raises(ValueError, match="missing"):
        Game("bad", {("C", "C"): (1, 1)})


def test_public_goods_game_is_a_social_dilemma():
    g = PublicGoodsGame()
    assert (g.players, g.endowment, g.multiplier) == (4, 10, 2.5)
    assert g.nash_contribution == 0 and g.social_optimum_contribution == 10 and g.is_social_dilemma
    # Free-riding pays individually: contributing one more unit costs 1 and returns 2.5/4.
    assert g.payoff(0, 30) > g.payoff(1, 30)
    assert g.payoff(10, 30) > g.payoff(0, 0)  # but all-in beats all-out for everyone

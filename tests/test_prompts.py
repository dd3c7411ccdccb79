from tomtransfer.shared.prompts import INSTRUCTIONS, PREAMBLE, build_messages
from tomtransfer.shared.scenarios import default_catalog


def test_messages_are_system_then_user():
    s = default_catalog().scenarios["IR_prison"]
    for kind in ("answer_only", "answer_motivation"):
        system, user = build_messages(s, kind)
        assert system["role"] == "system" and user["role"] == "user"
        assert system["content"].startswith(PREAMBLE)
        assert s.context.text.strip() in system["content"]
        assert system["content"].endswith(INSTRUCTIONS[kind])
        assert user["content"].startswith(s.game.render())
    assert "step by step" in build_messages(s, "answer_motivation")[1]["content"]
    assert "step by step" not in build_messages(s, "answer_only")[1]["content"]


def test_doubled_scenario_prompt_shows_doubled_payoffs():
    cat = default_catalog().scenarios
    assert "earn 20 points" in build_messages(cat["team_prison_x2"])[1]["content"]
    assert "earn 20 points" not in build_messages(cat["team_prison"])[1]["content"]


def test_pgg_prompt_asks_for_a_contribution():
    s = default_catalog().scenarios["pgg"]
    system, user = build_messages(s, "answer_only")
    assert "0 to 10" in system["content"] and "Alex" in system["content"]
    assert "2.5" in user["content"] and "Taylor, Jordan and Casey" in user["content"]
    assert "reasoning" in build_messages(s, "answer_motivation")[0]["content"]


def test_pgg_instruction_allows_any_amount():
    """The paper's PGG is continuous: the instruction asks for an amount from 0 to the endowment (not a whole
    number) and puts it first, so the leading answer is the answer (exact mode reads only that)."""
    from tomtransfer.shared.prompts import pgg_instruction, pgg_question

    game = default_catalog().scenarios["pgg"].game
    for motivation in (False, True):
        text = pgg_instruction(game, motivation)
        assert "whole" not in text.lower() and "from 0 to 10" in text
        assert "Start your answer with the amount." in text
    assert "reasoning" in pgg_instruction(game, True) and "Do not explain" in pgg_instruction(game, False)
    assert "whole" not in pgg_question(game).lower() and "0 to 10 dollars" in pgg_question(game)

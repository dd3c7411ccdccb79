"""Prompts as chat messages. Chat templates are applied later, by the engines.

system = scenario preamble + context + answer instruction; user = game text.
The preamble and the answer-and-motivation instruction are the paper's (its decoded training
example, `../shared/reference/lfb/finetune_example_from_training_log.txt`), so a student trained
here sees prompts shaped like the paper's.
"""

from __future__ import annotations

from typing import Literal

from tomtransfer.shared.games import PublicGoodsGame
from tomtransfer.shared.scenarios import Scenario

Instruction = Literal["answer_only", "answer_motivation"]
Message = dict[str, str]

PREAMBLE = "Consider the proposed scenario and act as if you were taking part in it."

INSTRUCTIONS: dict[str, str] = {
    "answer_motivation": (
        "Respond to the following using one letter to denote your choice. Write letter 'C' for strategy C "
        "or 'D' for strategy D. After that, provide reasoning for your choice."
    ),
    "answer_only": (
        "Your answer must consist of exactly one letter, either 'C' or 'D', to denote your preferred option "
        "(no need to explain your reasoning)."
    ),
}

GAME_CLOSING: dict[str, str] = {
    "answer_motivation": (
        "Think carefully about how you would approach this interaction in order to achieve the highest possible "
        "score in points, conditional on the action of your coplayer. Please think step by step before making "
        "a decision."
    ),
    "answer_only": (
        "Think carefully about how you would approach this interaction in order to achieve the highest possible "
        "score in points, conditional on the action of your coplayer."
    ),
}


def pgg_instruction(game: PublicGoodsGame, motivation: bool) -> str:
    """The PGG answer instruction. The paper's PGG is continuous, so any amount from 0 to the endowment is an
    answer ("$7.50" included); the amount comes first so that the leading answer is the answer."""
    tail = " After that, provide reasoning for your choice." if motivation else " Do not explain your reasoning."
    return (
        f"Respond with how much of your ${game.endowment} you put into the fund: any amount in dollars from 0 to "
        f"{game.endowment}. Start your answer with the amount.{tail}"
    )


def pgg_question(game: PublicGoodsGame) -> str:
    others = ", ".join(game.others[:-1]) + f" and {game.others[-1]}" if len(game.others) > 1 else game.others[0]
    return (
        f"You, {others} each hold ${game.endowment}. Every dollar put into the fund is multiplied by "
        f"{game.multiplier:g} and the result is shared equally among all {game.players} of you. "
        f"How much (0 to {game.endowment} dollars) do you contribute to the fund?"
    )


def build_messages(scenario: Scenario, instruction: Instruction = "answer_only") -> list[Message]:
    """The chat for one scenario. PGG scenarios ask for a contribution instead of C/D."""
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {instruction!r}; expected one of {sorted(INSTRUCTIONS)}")
    if isinstance(scenario.game, PublicGoodsGame):
        answer = pgg_instruction(scenario.game, motivation=instruction == "answer_motivation")
        user = pgg_question(scenario.game)
    else:
        answer = INSTRUCTIONS[instruction]
        user = scenario.game.render(GAME_CLOSING[instruction])
    system = f"{PREAMBLE} {scenario.context.text.strip()} {answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

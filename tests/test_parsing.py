"""The documented C/D rule and the PGG rule, by example and by property (real responses: test_parser_labelled.py)."""

import pytest
from hypothesis import given, strategies as st

from shared.parsing import parse_choice, parse_contribution


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  C", "C"),  # the paper's own leading-space answers
        ("C", "C"), ("D.", "D"), ("**D**", "D"), ("'C'", "C"), ("(D) because", "D"), ("C: cooperation", "C"),
        ("I choose C", "C"), ("I would choose strategy D.", "D"), ("Strategy C", "C"), ("My choice is **D**", "D"),
        ("Answer: C", "C"), ("I will go with option D", "D"), ("I'd opt for C.", "C"),
        ("I would choose strategy C.\nIf my coplayer chooses strategy D, I still earn 3.", "C"),
        ("Considering everything, C.", "C"),
        ("C and D are both plausible", None), ("C or D?", None), ("CD", None), ("Cooperate", None),
        ("", None), (None, None), ("I am not sure.", None), ("Both C and D have merits", None),
    ],
)
def test_choice_examples(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # nominal and other decisive phrasings (the issue's, and ones seen in the demo models' responses)
        ("Thinking it over, my choice would be D.", "D"), ("I'd go with C", "C"), ("**Answer: C**", "C"),
        ("I will choose to cooperate (C).", "C"), ("Letter 'C'", "C"), ("Letter 'C': Strategy C", "C"),
        ("Step 1 ...\nConclusion: **C**\nReasoning: if your coplayer chooses D ...", "C"),
        ("To maximize the score, you should choose D.", "D"), ("The best strategy is D, since ...", "D"),
        ("I’ll pick C.", "C"), ("So, I will start by choosing C.", "C"), ("My final answer is 'D'.", "D"),
        ("The only way to ensure a high score is to choose D.", "D"), ("You chose D, the only option for you.", "D"),
        ("It is essential to choose C here.", "C"), ("Here is the reasoning behind my decision to choose D:", "D"),
        ("Regardless of whether they cooperate, I choose D.", "D"), ("The answer is C.", "C"),
        ("The coplayer's decision to choose D has nothing to do with my choice.", None),
        ("Write letter 'C' for strategy C or 'D' for strategy D.", None), ("The options are: C, D", None),
        # hypotheticals, outcomes and option lists are not decisions
        ("If you choose C and your coplayer chooses D, you earn 2 points.", None),
        ("If I choose C, I earn 5. If I choose D, I earn 3.", None), ("Suppose you choose C. Then you earn 1.", None),
        ("Let's assume you choose strategy C and your coplayer chooses C.", None),
        ("When you choose D while your coplayer chooses C, you earn 10 points.", None),
        ("You can choose either C or D.", None), ("- **Strategy C**: 5 points\n- **Strategy D**: 3 points", None),
        ("That's what strategy C is all about.", None), ("At least one of them must choose C.", None),
        ("You could decide to take the strategy C.", None),
        # contradictory decisions are invalid, in any order; another letter counts as a contradiction
        ("I will choose C. On reflection I will choose D.", None), ("I will choose A, then I will choose D.", None),
        ("My choice would be C or D.", None),
    ],
)
def test_decisive_phrases(text, expected):
    assert parse_choice(text) == expected


DECOR = st.sampled_from(["", " ", "  ", "\n", "**", "*", "`", "'", '"', "(", "["])
TAIL = st.sampled_from(["", ".", "!", "\n\nBecause cooperation pays.", ": the reason is trust.", " - it is safer"])


@given(letter=st.sampled_from("CD"), pre=DECOR, post=TAIL)
def test_leading_letter_always_wins(letter, pre, post):
    closing = {"**": "**", "*": "*", "`": "`", "'": "'", '"': '"', "(": ")", "[": "]"}.get(pre.strip(), "")
    assert parse_choice(f"{pre}{letter}{closing}{post}") == letter


@given(letter=st.sampled_from("CD"), verb=st.sampled_from(["I choose", "I would choose", "My choice is", "I pick", "I'll go with"]),
       noun=st.sampled_from(["", "strategy ", "option "]), prefix=st.sampled_from(["", "After thinking it over, ", "Well. "]))
def test_explicit_choice_phrases(letter, verb, noun, prefix):
    assert parse_choice(f"{prefix}{verb} {noun}{letter}, since my coplayer may choose the other.") == letter


@given(st.text(alphabet=st.characters(blacklist_characters="CDcd"), max_size=200))
def test_text_without_letters_is_invalid(text):
    assert parse_choice(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [("7", 7), ("  10", 10), ("$4", 4), ("I contribute $5 of my $10", 5), ("Out of $10 I will put 6 into the fund", 6),
     ("I would contribute all of my $10", 10), ("11", None), ("-3", None), ("I keep it all", None),
     ("Maybe 3 or 4", None), ("", None),
     # continuous (the paper's PGG): any amount in [0, endowment]; this example was ("2.5", None) for the whole-number PGG
     ("2.5", 2.5), ("$7.50", 7.5), ("7.5 dollars, because ...", 7.5), ("**6.5**", 6.5), ("0.0", 0.0), ("10.01", None),
     # nominal phrasings
     ("Thinking about it, my donation would be 5.", 5), ("My chosen donation amount would be 7", 7),
     ("I would contribute $5.", 5), ("I'd put in $3 because I trust them.", 3), ("I provided 1 dollar.", 1),
     ("The amount you contribute to the fund is $\\boxed{7.5}$.", 7.5), ("You should donate 4 dollars.", 4),
     ("I have $10. I contribute $3.50 to the shared party.", 3.5), ("Final answer: $8", 8), ("Reasoning first.\n\n**6**", 6),
     ("The answer is $0.", 0), ("I contribute nothing.", 0), ("I would contribute five dollars.", 5),
     ("I will give two reasons: trust and fun.", None), ("We compute:\n\\[\n2.5\n\\]\nSo the share is 2.5", None),
     # the leading amount decides (as exact mode reads it), arithmetic and out-of-range amounts are no answers
     ("4.5 * 10 ≈ 45", None), ("10 x 2.5 = 25", None), ("$10 \\times 2.5 = $25", None), ("15", None),
     ("4.25\n\nSo, you contributed $25 to the fund.", 4.25),
     # hypotheticals, other players, contradictions
     ("If you contribute 5, the fund gets 12.5.", None), ("Each person can contribute either $0 or $1.", None),
     ("Taylor puts in $10.", None), ("I contribute $5. Actually I contribute $7.", None), ("I would give 12 dollars.", None),
     ("You, Taylor, Jordan and Casey each contribute $1 to the fund.", None), ("I contribute 5% of it.", None)],
)
def test_contribution_examples(text, expected):
    got = parse_contribution(text, 10)
    assert got == expected
    assert got is None or type(got) is float


@given(x=st.integers(0, 10), pre=st.sampled_from(["", " ", "$", "**"]), post=st.sampled_from(["", ".", " dollars", "\nbecause"]))
def test_leading_contribution_in_range(x, pre, post):
    assert parse_contribution(f"{pre}{x}{post}", 10) == x


@given(x=st.integers(11, 10**6))
def test_out_of_range_contribution_is_invalid(x):
    assert parse_contribution(str(x), 10) is None

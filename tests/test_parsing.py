"""The documented C/D rule and the PGG rule, by example and by property."""

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
     ("I would contribute all of my $10", 10), ("11", None), ("-3", None), ("2.5", None), ("I keep it all", None),
     ("Maybe 3 or 4", None), ("", None)],
)
def test_contribution_examples(text, expected):
    assert parse_contribution(text, 10) == expected


@given(x=st.integers(0, 10), pre=st.sampled_from(["", " ", "$", "**"]), post=st.sampled_from(["", ".", " dollars", "\nbecause"]))
def test_leading_contribution_in_range(x, pre, post):
    assert parse_contribution(f"{pre}{x}{post}", 10) == x


@given(x=st.integers(11, 10**6))
def test_out_of_range_contribution_is_invalid(x):
    assert parse_contribution(str(x), 10) is None

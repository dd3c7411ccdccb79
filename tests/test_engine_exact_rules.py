"""Exact mode's answer rules: the 'decided' test on text prefixes must agree with the parser.

`ChoiceRule.status(s)` / `ContributionRule.status(s)` say a prefix already decides the leading answer; then no
continuation may change what `shared.parsing`'s leading rule reads. Checked on examples and on random strings
built from the pieces that matter (letters, decoration, keywords, conjunctions, digits, dots).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomtransfer.services.teacher.exact import UNDECIDED, ChoiceRule, ContributionRule, lead_choice, lead_contribution
from tomtransfer.shared.parsing import parse_choice, parse_contribution

CHOICE = ChoiceRule()
PGG = ContributionRule(10)


@pytest.mark.parametrize("text,expected", [
    ("", UNDECIDED), (" ", UNDECIDED), ("**", UNDECIDED), ("C", UNDECIDED), ("D", UNDECIDED), ("c", UNDECIDED),
    ("C.", "C"), ("D:", "D"), ("**C**", "C"), (" C because", "C"), ("(D)", "D"), ("Sure", None), ("I choose C", None),
    ("Cooperate", None), ("C and D", UNDECIDED), ("C and D.", None), ("C, ", UNDECIDED), ("C or", UNDECIDED), ("C an", UNDECIDED), ("Answer", UNDECIDED),
    ("Answer: D.", "D"), ("ans", UNDECIDED), ("Option B", None), ("C, because", "C"), ("C, b", "C"),
    ("C/D", UNDECIDED), ("C/D ", None), ("C\ufffd", UNDECIDED), ("Sure\ufffd", None),
])
def test_choice_status_examples(text, expected):
    assert CHOICE.status(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("", UNDECIDED), ("$", UNDECIDED), ("1", UNDECIDED), ("10", UNDECIDED), ("10 d", "10"), ("5.", UNDECIDED),
    ("5.0", UNDECIDED), ("5.0 d", "5"), ("5.5", None), ("11", None), ("$7 because", "7"), ("I give 5", None),
    ("**3**", "3"), ("0", UNDECIDED), ("0 dollars", "0"), ("10\n", "10"),
    # a leading number that may still start arithmetic or a percentage is not decided yet ("10 * 2.5 = 25")
    ("10 ", UNDECIDED), ("5.0 ", UNDECIDED), ("4 *", UNDECIDED), ("4 * 10", None), ("4 **", "4"), ("10 x", UNDECIDED),
    ("10 x 2", None), ("10 \\ti", UNDECIDED), ("10 \\times", None), ("5%", None), ("2 + 3", None),
    # off the whole-number grid: decided, not a grid answer (the full parser reads 7.5; see exact.py's docstring)
    ("7.5", None), ("7.5 ", None), ("$7.50 because", None),
])
def test_contribution_status_examples(text, expected):
    assert PGG.status(text) == expected


def test_final_status_is_the_leading_rule():
    for text in ["C", "D", "Cooperate", "", "**D**", "Answer: C"]:
        assert CHOICE.status(text, final=True) == lead_choice(text)
    for text in ["1", "10", "11", "$5", ""]:
        assert PGG.status(text, final=True) == lead_contribution(text, 10)


def test_leading_rule_agrees_with_the_parser_when_it_decides():
    for text in ["C.", "**D** because", "Answer: C", " c - yes", "D, since"]:
        assert lead_choice(text) == parse_choice(text)
    for text in ["5 dollars", "$10.", "0", "**7**\nI keep 3.", "6 - I trust them"]:
        assert float(lead_contribution(text, 10)) == parse_contribution(text, 10)


def test_off_grid_and_arithmetic_leading_amounts():
    """The parser reads a continuous contribution; exact mode's grid is whole numbers, so a leading 7.5 is no grid
    answer there (counted invalid, not rounded); arithmetic at the start is no answer for either."""
    for text in ["7.5", "$7.50 because", "2.5 dollars"]:
        assert lead_contribution(text, 10) is None and parse_contribution(text, 10) == float(text.split()[0].strip("$"))
    for text in ["4.5 * 10 ≈ 45", "10 x 2.5 = 25", "$10 \\times 2.5 = $25", "2 + 3 = 5", "50% of it"]:
        assert lead_contribution(text, 10) is None and parse_contribution(text, 10) is None


PIECES = ["C", "D", "c", "d", " ", "*", "**", ".", ",", ":", "-", "(", ")", "\n", "and", "or", " and ", " or ", "/",
          "&", "Answer", "ans", "wer", "Choice", "opt", "ion", "x", "Coop", "erate", "1", "0", "5", "$", ".5", "e",
          "\ufffd", "D D", "letter", "strategy", "=", "×", "%", " x ", "\\times", "\\t", "+", "7.5"]
texts = st.lists(st.sampled_from(PIECES), min_size=0, max_size=5).map("".join)


@settings(max_examples=1500, deadline=None)
@given(prefix=texts, suffix=texts)
def test_decided_choice_prefixes_never_change(prefix, suffix):
    s = CHOICE.status(prefix)
    if s is not UNDECIDED and "\ufffd" not in prefix:
        assert lead_choice(prefix + suffix) == s, (prefix, suffix, s)


@settings(max_examples=1500, deadline=None)
@given(prefix=texts, suffix=texts)
def test_decided_contribution_prefixes_never_change(prefix, suffix):
    s = PGG.status(prefix)
    if s is not UNDECIDED and "\ufffd" not in prefix:
        assert lead_contribution(prefix + suffix, 10) == s, (prefix, suffix, s)


@pytest.mark.parametrize("model", [pytest.param("smollm2-135m-instruct", marks=pytest.mark.real_model),
                                   pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.real_model), "tiny"])
def test_decode_many_equals_batch_decode(model):
    """The expansion's fast decode (Rust backend) gives exactly transformers' batch_decode without clean-up, on
    the demo models' tokenizers and the tiny one, including special tokens and byte pieces split across tokens."""
    import random

    from transformers import AutoTokenizer

    from tomtransfer.services.common.models import resolve_model
    from tests.fixtures.tiny_models import tiny_model_dir
    from tomtransfer.services.teacher.exact import decode_many

    path = tiny_model_dir("llama", seed=3) if model == "tiny" else resolve_model(model)
    tok = AutoTokenizer.from_pretrained(str(path))
    rng = random.Random(0)
    n = len(tok)
    special = sorted(tok.all_special_ids)
    ids = tok("Réponse: **C** — d'accord 🙂 10$", add_special_tokens=False)["input_ids"]
    seqs = [ids[: k + 1] for k in range(len(ids))] + [special[:1] + ids[:3]]
    seqs += [[rng.randrange(n) for _ in range(rng.randint(1, 6))] for _ in range(300)]
    want = tok.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert decode_many(tok, seqs) == want

"""The documented C/D rule and the PGG rule, by example and by property (real responses: test_parser_labelled.py)."""

import pytest
from hypothesis import given, settings, strategies as st

from tomtransfer.shared.parsing import parse_choice, parse_contribution


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
        ("I will choose C. I will choose D.", None), ("I will choose A, then I will choose D.", None),
        # (an explicit self-correction is not a contradiction: the corrected answer counts; see test_revisions)
        ("I will choose C. On reflection I will choose D.", "D"),
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
     ("I would contribute all of my $10", 10), ("11", None), ("-3", None), ("I keep it all", 0),
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
     ("Taylor puts in $10.", None), ("I contribute $5. I contribute $7.", None),
     ("I contribute $5. Actually I contribute $7.", 7), ("I would give 12 dollars.", None),
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


# ---------------------------------------------------------------------------------------------------------------
# The grammar of decisions (shared/parsing.py's docstring): SUBJECT x CHAIN x VERB x OBJECT, nominal forms, labels

@pytest.mark.parametrize(
    "text, expected",
    [
        # the issue's three sentences
        ("I choose to donate $7 to the party fund.", 7), ("I would like to donate 5 points to the fund.", 5),
        ("As Alex, my choice of donation is 7.", 7),
    ],
)
def test_the_issues_first_person_giving_statements(text, expected):
    assert parse_contribution(text, 10) == expected


SUBJECTS = ["I", "As Alex, I", "Thinking it over, I", "**Alex:** I", "After weighing the payoffs at length.\n\nI"]
CHAINS = ["would", "will", "'d", "’ll", "shall", "am going to", "'m going to", "want to", "would like to",
          "'d like to", "have decided to", "decided to", "choose to", "plan to", "intend to", "will therefore",
          "would probably", "'ll go ahead and", "am willing to", "'ve chosen to"]
CHOOSING = ["choose", "pick", "go with", "opt for", "select", "stick with", "settle on"]
GIVING = ["donate", "contribute", "give", "put", "invest", "offer", "allocate", "pledge", "send"]


def _i(subject: str, chain: str) -> str:
    return f"{subject}{chain}" if chain[:1] in "'’" else f"{subject} {chain}"


@pytest.mark.parametrize("verb", CHOOSING)
@pytest.mark.parametrize("chain", CHAINS)
def test_first_person_choosing_a_letter(chain, verb):
    for letter in "CD":
        for obj in (letter, f"strategy {letter}", f"**{letter}**", f"option '{letter}'"):
            for subject in SUBJECTS:
                assert parse_choice(f"{_i(subject, chain)} {verb} {obj}, I think.") == letter


@pytest.mark.parametrize(
    "text, expected",
    [
        # nominal, label, advice and impersonal forms of the same grammar
        ("My final decision: **D**", "D"), ("My choice here would be C.", "C"), ("My plan is to play D.", "D"),
        ("Our answer is C.", "C"), ("### Decision\n\n**C**", "C"), ("**Final Answer: D**", "D"),
        ("Final decision - D", "D"), ("C is my choice, since trust matters.", "C"), ("Alex: C", "C"),
        ("**Assistant:** D\n\nBecause ...", "D"), ("You should go with C.", "C"), ("You'd better pick D.", "D"),
        ("The wisest choice would be D.", "D"), ("D is the best option here.", "D"), ("I am choosing D.", "D"),
        ("I've settled on C.", "C"), ("I vote for D.", "D"), ("I'll play C.", "C"),
        # the player's own statement outranks advice and impersonal ones
        ("The rational choice is D, but I choose C.", "C"),
        ("In theory, D is the best option. I'd still go with C.", "C"),
        # advice is not a condition; concession is not a condition
        ("If I were you, I would choose D.", "D"), ("Even if my coplayer defects, I choose C.", "C"),
        # conditions, questions and negations decide nothing
        ("I would choose C if my coplayer were a friend.", None), ("Should I choose C?", None),
        ("I would choose C if my coplayer were a friend, but since they are not, I choose D.", "D"),
        ("I could choose C or D.", None), ("I might pick C.", None),
        ("I would not choose D.", "C"),  # two strategies: refusing one is choosing the other
        ("I choose C if they cooperate, and D if they defect.", None),
        # contradictions are invalid
        ("I'd go with C. Then I'd go with D.", None), ("I pick C. You should pick D. I pick D.", None),
        ("My final answer: C. Final answer: D", None),
        ("I choosed well.", None), ("My choices are C and D.", None),
        # let's, a praised gerund, line labels and a line that is only the verb and the letter
        ("Let's go with C.", "C"), ("Choosing C is the best option.", "C"), ("Choosing D is a risky move.", None),
        ("**Strategy:** D", "D"), ("Reasoning first.\n\n**Choose C**\n\nThat is all.", "C"),
        ("Decision: choose D", "D"), ("Options:\n- Choose C\n- Choose D", None),
        # hypothetical scenarios
        ("Case 1: I choose C and they choose C.", None), ("Say I choose D, then I earn 5.", None),
    ],
)
def test_choice_grammar(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize("verb", GIVING)
@pytest.mark.parametrize("chain", CHAINS)
def test_first_person_giving_an_amount(chain, verb):
    for amount, value in (("7", 7), ("$3.50", 3.5), ("seven dollars", 7), ("0", 0), ("$10", 10), ("nothing", 0)):
        for subject in SUBJECTS:
            assert parse_contribution(f"{_i(subject, chain)} {verb} {amount} to the fund.", 10) == value


@pytest.mark.parametrize(
    "text, expected",
    [
        # units
        ("I'd donate 5 units.", 5), ("I'll contribute 4 tokens.", 4), ("I would put in 6 points.", 6),
        ("I'll chip in 2 bucks.", 2), ("I'd contribute 50 cents.", 0.5), ("I'd give a dollar.", 1),
        ("I will contribute $\\boxed{6}$.", 6), ("I'd contribute **$7**.", 7), ("I'd put into the fund $5.", 5),
        # number words
        ("I would contribute seven.", 7), ("I'll give ten dollars.", 10), ("I'd contribute zero.", 0),
        ("I will contribute seven and a half dollars.", 7.5), ("I will give two reasons: trust and fun.", None),
        ("I'll pick one of the options.", None),
        # everything, half, nothing
        ("I'd give everything.", 10), ("I'll contribute all of my money.", 10), ("I'll contribute all $10.", 10),
        ("I will contribute the maximum.", 10), ("I'll contribute half of my money.", 5),
        ("I'd contribute none of it.", 0),
        ("I won't contribute anything.", 0), ("I will not give a single dollar.", 0),
        # keep K = contribute endowment - K
        ("I'll keep 3 and contribute the rest.", 7), ("I'll keep $3 for myself.", 7), ("I keep it all.", 0),
        ("I'd keep nothing.", 10), ("I'll keep 3 dollars and contribute 7.", 7), ("I keep 12.", None),
        ("I'll keep 3 and contribute 5.", None),
        # nominal, labels, advice, impersonal, speaker tags
        ("My contribution to the party fund would be $6.", 6), ("My plan is to give 4.", 4),
        ("**Contribution:** $8", 8), ("Donation: 4", 4), ("## Final Answer\n\n7", 7), ("Final decision: $3", 3),
        ("**Amount to contribute:** $6", 6), ("$7 is my contribution.", 7), ("The amount I'll contribute is $4.", 4),
        ("Answer: I would donate 3 points to the fund.", 3), ("Alex: 7.", 7),
        ("Alex: 7 people are in the group.", None),
        ("I'd go with 7.", 7), ("I'm going with $6.", 6), ("You should contribute 0 dollars.", 0),
        ("The wisest choice would be to contribute $5.", 5), ("Let's contribute $4.", 4),
        ("Contributing $6 seems like a fair compromise.", 6), ("Contributing $10 is a risky move.", None),
        ("**Decision:** Contribute $7", 7), ("## My Decision\n\n**Contribute $7 to the fund**", 7),
        ("**Scenario A:** I contribute $10.\n**Scenario B:** I contribute $0.\n\nI will contribute $6.", 6),
        ("Say I contribute $5, then I get $10.", None),
        # the player's own statement outranks advice and impersonal ones
        ("The rational move would be to contribute $0, but as Alex, I'd contribute $7.", 7),
        ("In this game the dominant strategy is to contribute 0. Nevertheless, I'd contribute 6.", 6),
        # conditions, questions, hedges, ranges decide nothing
        ("If everyone contributes $10, we each get $25. I'll contribute $5.", 5),
        ("I would put in $10 if I could trust them, but since I can't, I'll contribute $5.", 5),
        ("I would contribute $10 if I could trust them.", None), ("Should I contribute $10? I'll contribute $5.", 5),
        ("I could give 10.", None), ("I might contribute 3.", None), ("I'd contribute 5 or 6.", None),
        ("I'd contribute $5-$7.", None), ("I would contribute between 4 and 6 dollars.", None),
        ("I'd contribute 50%.", None), ("I would not contribute 10.", None),
        # contradictions and out-of-range amounts are invalid
        ("I'll contribute $7. I'll contribute $6", None), ("I would donate 12 points.", None),
        ("I'd give $5. I'll give $8.", None), ("I'd contribute -2.", None),
    ],
)
def test_contribution_grammar(text, expected):
    got = parse_contribution(text, 10)
    assert got == expected
    assert got is None or type(got) is float


@settings(max_examples=400, deadline=None)
@given(subject=st.sampled_from(SUBJECTS), chain=st.sampled_from(CHAINS + [""]), verb=st.sampled_from(GIVING),
       x=st.integers(0, 20), form=st.sampled_from(["{x}", "${x}", "${x}.00", "{x} dollars", "{x} points", "{x} units",
                                                   "{w}", "{w} dollars", "exactly {x}", "only ${x}"]),
       tail=st.sampled_from(["", ".", " to the fund.", " into the party fund, because I trust them.", " out of my 20.",
                             " and hope the others do the same."]),
       endowment=st.sampled_from([10, 20]))
def test_every_first_person_giving_statement_in_range_parses(subject, chain, verb, x, form, tail, endowment):
    """Any "I <chain> <giving verb> <amount> ..." reads as the amount when it is in [0, endowment], else invalid."""
    words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen eighteen nineteen twenty").split()
    amount = form.format(x=x, w=words[x])
    text = f"{_i(subject, chain)} {verb} {amount}{tail}" if chain else f"{subject} {verb} {amount}{tail}"
    assert parse_contribution(text, endowment) == (x if x <= endowment else None)


@settings(max_examples=200, deadline=None)
@given(chain=st.sampled_from(CHAINS + [""]), k=st.integers(0, 10), unit=st.sampled_from(["", " dollars", "$"]))
def test_keeping_is_contributing_the_rest(chain, k, unit):
    amount = f"${k}" if unit == "$" else f"{k}{unit}"
    text = f"{_i('I', chain)} keep {amount} for myself." if chain else f"I keep {amount} for myself."
    assert parse_contribution(text, 10) == 10 - k


@pytest.mark.parametrize(
    "text, expected",
    [
        # a self-correction or a final answer overrides earlier statements and the leading answer; two of them
        # that disagree, or an unmarked contradiction, leave the response invalid
        ("I'd go with C. My final answer: D", "D"), ("I choose strategy C. Therefore, my final choice is D.", "D"),
        ("I'll choose C...\n\nActually, on reflection, I want to revise that. So my answer is D.", "D"),
        ("C\n\nActually, D.", "D"), ("C.\n\nD is the better option, so D is what I'd pick.", None),
        ("My final answer: C. Final answer: D", None),
    ],
)
def test_revisions(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$10\n\nContributing everything helps the group. But I can't trust them, so I'll actually contribute $0.", 0),
        ("I'll contribute $7. My final answer: $6", 6), ("I'd give $5. On second thought, I'll give $8.", 8),
        ("$0 is the individually rational answer. But these are my housemates: I'd put in $8.", 8),
    ],
)
def test_contribution_revisions(text, expected):
    assert parse_contribution(text, 10) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # a reasoning trace is not the answer; where the visible text states none, the trace's decision counts
        ("<think>\nIf I pick D I get 10. I'll pick D.\n</think>\n\n**Decision: C**\n\nC is safer.", "C"),
        ("<think>\nD dominates. Therefore, I choose D.\n</think>", "D"), ("\\boxed{D}", "D"),
        ("**Answer:** $\\boxed{C}$\n\nBecause ...", "C"),
        # another answer right after the leading one, or a condition, leaves no leading answer
        ("C (or D)", None), ("**C** and **D** both have merit.", None),
        ("C if they are trustworthy, D otherwise.", None),
        ("C (C is safer).", "C"),
        # a decision that holds in every case considered
        ("If my roommate picks C, I pick C. If my roommate picks D, I still pick C.", "C"),
        ("If they pick C, I pick C. If they pick D, I pick D.", None), ("If they pick C, I pick C.", None),
        # a condition inside parentheses reaches no further than them
        ("D earns more (6 vs 4 if they choose D), so D is what I'd pick.", "D"),
        # vocabulary of the prompts: policies and approaches
        ("I choose to adopt policy C.", "C"), ("The best approach would be to choose strategy C.", "C"),
        # game-theoretic descriptions are no decisions
        ("The dominant strategy is D. It's a tough call.", None),
    ],
)
def test_visible_answer_and_leading_answer(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # leading amounts in words and shares, appositions
        ("Five dollars.", 5), ("Five.", 5), ("**Nothing.**\n\nHere's why: ...", 0), ("**Half** of my $10.", 5),
        ("**All of it - $10!**", 10), ("Half my endowment, $5.", 5), ("Nothing is certain, but I'd give 4.", 4),
        # another amount right after the leading one
        ("$5-$10", None), ("**$5-7**", None), ("$5 or $6.", None), ("$5 — or maybe $6.", None),
        ("$10 if everyone else gives too.", None),
        # shares of the endowment
        ("I would contribute 70% of my endowment.", 7), ("My contribution is 50% of my endowment.", 5),
        ("I'd contribute a quarter of my money.", 2.5), ("I will put in everything except $1.", 9),
        ("I'll give all but 2 dollars.", 8), ("I contribute 5% of it.", None),
        # traces and boxes
        ("<think>\nFull cooperation gives 25 each. I'll go with 10.\n</think>\n\n$4\n\nI contribute $4.", 4),
        ("<think>\nPayoff falls in x.\n</think>\n\n\\boxed{0}\n\nSince ...", 0),
        ("<think>\nSo the answer is 7.\n</think>", 7),
        # a condition that does not reach the statement
        ("If the multiplier were 4, each dollar would return $1, so I would contribute all $10.", None),
    ],
)
def test_leading_and_shared_amounts(text, expected):
    assert parse_contribution(text, 10) == expected

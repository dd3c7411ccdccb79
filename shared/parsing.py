"""Turning a response into an answer: `C`, `D`, or invalid (None); a PGG contribution or invalid.

The rule reads what a careful person reads: the answer the response states as the player's own decision,
and nothing where it states none or contradicts itself. It is checked against 404 hand-labelled real
responses of the demo models (`tests/data/labelled_responses.jsonl`, `tests/test_parser_labelled.py`):
99.4 % agreement on the 320 it was written against, 92.9 % on 84 held-out ones before the last three
phrases were added (96.4 % after); every miss there is "invalid" where a reader finds an answer in the
student's garbled text, never another answer.

C/D, in order (the first step that decides wins):
1. Leading answer: after stripping whitespace and markdown/quote/bracket decoration, the response
   starts with a standalone C or D (`'  C'`, `'**D**'`, `'C.'`, `'D: because ...'`, `'(C)'`,
   `'Answer: C'`, `'Strategy D'`), not "C and D"/"C or D"/"C/D". Exact mode reads only this step.
2. Explicit choice: every *decisive phrase* that is not in a conditional sentence, followed by the letter
   (decoration, "strategy"/"option"/"letter", "to cooperate" may come between: "I will choose to cooperate (C)"):
   first person  "I choose", "I would go with", "I'd opt for", "I'll pick", "I will start by choosing",
                 "I have no choice but to choose";
   nominal       "my (final) choice/answer/decision/strategy is / would be / :", "the (best) strategy is",
                 "answer:", "conclusion:", "the decision is based on", "(the reasoning behind) my decision to
                 choose", "Letter 'C'" opening a line;
   advice        "you should/must/need to/would/will choose", "you chose", "... is to choose",
                 "it is best/essential/wise to choose".
   All of them must name the same letter, else the response is invalid (also "I will choose A" next to
   "I will choose D"). A sentence is conditional when if/when/whenever/suppose/assume/unless/in case/
   imagine/let's say/for example comes before the phrase in it (at most 400 characters back; a decimal
   point does not end a sentence) ("If I choose C, ...", "When you choose D,
   ...", "Let's assume you choose strategy C"): it describes an outcome, not a decision. Present-tense
   "you choose C" is how the prompts state outcomes and never counts, nor do "you could/can choose".
3. Final letter: otherwise, if the last line is just C or D (decorated), or ends with one after a comma
   or colon ("Considering everything, C."; not "C, D"), that one.
Anything else - both letters with no decisive phrase, letters only in payoffs, option lists or
hypotheticals, no letter - is invalid. A standalone letter is one not glued to other letters or digits
("CD", "Cc", "C3" are not answers); phrases match case-insensitively, the letter must be C/D or c/d.
(Before the labelled set this rule also took any "choose C"/"strategy C" and a sole letter anywhere in the
text; on the 320 labelled responses that rule was wrong 98 times, mostly on payoff recitals such as
"If you choose C and your coplayer chooses D, ...".)

PGG - continuous, as in the paper: any amount in [0, endowment] ("$7.50" is 7.5) - in the same order:
1. Leading amount: a number at the very start (after `\\s*_\\`'"([` and an optional `$`), unless it is a
   percentage or starts arithmetic ("4.5 * 10", "10 x 2.5", "2 + 3", "10 \\times 2.5"); outside [0, endowment]
   the response is invalid (the leading answer decides). Exact mode reads this step (whole numbers only).
2. Explicit contribution: every decisive phrase outside a conditional sentence, followed by the amount -
   "I contribute $5", "I would put 6 into the fund", "I'd give all of my $10", "I provided 1 dollar",
   "you should donate 3", "you put $1", "my donation would be 5", "my chosen donation amount would be 7",
   "my answer: 4", "the amount you contribute to the fund is $\\boxed{7.5}$", "final answer: 8",
   "the answer is $0"; an amount
   is a number (not a percentage, not the start of arithmetic), "nothing" (0) or "five dollars". All must
   name the same amount, in range.
3. Final amount: otherwise, if the last line is just an amount ("**6**", "$6", "6 dollars"), that one.
Otherwise invalid ("Maybe 3 or 4", "each person can contribute either $0 or $1", an out-of-range amount).
"""

from __future__ import annotations

import re
from bisect import bisect_right

_DECORATION = "*_`'\"()[]{}<>#>~ \t\r\n"
_LEADING = re.compile(r"^(?:answer|choice|decision|strategy|option|letter)?\s*[:\-=]?\s*([CD])(?![A-Za-z0-9])(?!\s*(?:and|or|&|/|,)\s*[CD](?![A-Za-z0-9]))", re.I)

# a conditional sentence: the words that make what follows a hypothetical
_CONDITIONAL = re.compile(
    r"\b(?:if|when|whenever|suppose|supposing|assume|assuming|unless|in\s+case|imagine|let['’]?s\s+say"
    r"|for\s+example)\b",
    re.I)
# the start of the sentence a match is in: the last sentence end (not a decimal point) or line break before it
_SENTENCE_END = re.compile(r"[.!?](?!\d)|\n")
_SENTENCE_MAX = 400  # a conditional word further back than this does not count (keeps parsing linear in the text)

_VERB = (r"(?:choose|chose|chosen|choosing|pick|picked|select|selected|opt\s+for|opted\s+for|go\s+with|went\s+with"
         r"|play|take)")
_I = r"\bi(?:\s+|(?=['’]))"  # "I choose", "I'd", "I’ll"
_YOU = r"\byou(?:\s+|(?=['’]))"
_AUX = (r"(?:would\s+|will\s+|['’]d\s+|['’]ll\s+|shall\s+|(?:am|['’]m)\s+going\s+to\s+|(?:have\s+)?decided?\s+to\s+"
        r"|want\s+to\s+)?")
_CHOICE_PHRASES = "|".join(
    [
        # first person: "I choose", "I would go with", "I'd opt for", "I will start by choosing"
        rf"{_I}{_AUX}(?:start\s+by\s+|end\s+up\s+)?{_VERB}",
        r"\bno\s+choice\s+but\s+to\s+" + _VERB,
        # nominal: "my choice would be", "the best strategy is", "answer:", "conclusion:", "letter 'C'"
        r"\b(?:my|our)\s+(?:final\s+|chosen\s+|preferred\s+)?(?:choice|answer|decision|pick|strategy|move|option|vote)"
        r"\s*(?:is|would\s+be|will\s+be|[:=])",
        r"\bthe\s+(?:(?:best|optimal|right|final|correct)\s+)?(?:choice|answer|decision|strategy|option|move)"
        r"\s+(?:is|would\s+be|will\s+be)",
        r"\b(?:final\s+)?(?:answer|choice|decision|conclusion)\s*(?:is\s*)?[:=]",
        r"\bthe\s+decision\s+is\s+based\s+on",
        r"\b(?:(?:my|our)|(?:reason|reasons|reasoning|rationale)\s+(?:behind|for)\s+(?:the|my))\s+decision\s+to\s+"
        + _VERB,
        r"(?:^|\n)[\s*#>_-]*letter\s*[:=]?",  # "Letter 'C'" opening a line
        # advice to the player (the prompts address the model as "you")
        rf"{_YOU}(?:should|must|need\s+to|have\s+to|would|will|['’]d|['’]ll)\s+(?:definitely\s+|always\s+)?{_VERB}",
        r"\byou\s+(?:chose|picked|selected|opted\s+for|went\s+with)",
        rf"\bis\s+to\s+{_VERB}",
        rf"\b(?:best|better|essential|wise|wisest|optimal|rational|smart|advisable)\s+to\s+{_VERB}",
    ]
)
_LETTER_AFTER = (
    r"\s*(?:to\s+(?:cooperate|defect)\s*)?[*_`'\"(\[]*\s*(?:strategy\s+|option\s+|letter\s+)?[*_`'\"(\[]*"
    r"(?-i:([A-Z]|[cd]))(?![A-Za-z0-9])(?!\s*(?:and|or|&|/|,)\s*[CDcd](?![A-Za-z0-9]))"
)
_CHOICE = re.compile(rf"(?:{_CHOICE_PHRASES}){_LETTER_AFTER}", re.I)
# the last line is just the letter, or ends with it after a comma/colon ("Considering everything, C."), not "C, D"
_FINAL_LETTER = re.compile(r"(?:.*(?<!\b[CD])[,:][ \t]*)?[ \t*_`'\"(\[]*([CD])[ \t*_`'\")\]]*[.!]?[ \t*]*")


def _decisive(pattern: re.Pattern, text: str) -> list[re.Match]:
    """The matches of `pattern` whose sentence is not conditional before them (see the module docstring)."""
    found = list(pattern.finditer(text))
    if not found:
        return []
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    keep = []
    for m in found:
        begin = ends[bisect_right(ends, m.start()) - 1] if ends and ends[0] <= m.start() else 0
        begin = max(begin, m.start() - _SENTENCE_MAX)
        if _CONDITIONAL.search(text, begin, m.start()) is None:
            keep.append(m)
    return keep


def parse_choice(text: str | None) -> str | None:
    """`C`, `D` or None (invalid). See the module docstring for the rule."""
    if not text:
        return None
    head = text.lstrip(_DECORATION)
    m = _LEADING.match(head)
    if m:
        return m.group(1).upper()
    named = {m.group(1).upper() for m in _decisive(_CHOICE, text)}
    if named:
        return named.pop() if len(named) == 1 and named <= {"C", "D"} else None
    m = _FINAL_LETTER.fullmatch(_last_line(text))
    return m.group(1) if m else None


def _last_line(text: str) -> str:
    return text.rstrip().rsplit("\n", 1)[-1]


# an amount: "$7.50", "7", "$\boxed{7.5}$"; not a percentage, not the start of arithmetic ("4.5 * 10", "10 x 2")
_ARITHMETIC = r"[ \t]*(?:[×/+=≈^]|\*(?!\*)|\\times|\\cdot|x[ \t]*\d)"
_NUMBER = r"\$?\s*(-?\d+(?:\.\d+)?)(?!\d|\.\d)(?![ \t]*%)(?!" + _ARITHMETIC + ")"
_AMOUNT = r"[*_`'\"(\[]*\s*(?:\$\s*)?(?:\\boxed\{\s*)?" + _NUMBER
_CONTRIB_VERB = (r"(?:contribute|contributed|contributing|put|putting|give|gave|giving|donate|donated|donating"
                 r"|invest|invested|provide|provided)")
_CONTRIB_PHRASES = "|".join(
    [
        # first person: "I contribute", "I would put in", "I'd give all of my"
        rf"{_I}{_AUX}(?:only\s+|just\s+)?{_CONTRIB_VERB}",
        # advice / statement to the player: "you should donate", "you will put", "you put"
        rf"{_YOU}(?:should\s+|must\s+|would\s+|will\s+|['’]d\s+|['’]ll\s+)?(?:only\s+|just\s+)?{_CONTRIB_VERB}",
        # nominal: "my donation would be", "my chosen donation amount is", "my answer:"
        r"\b(?:my|our)\s+(?:final\s+|chosen\s+)?(?:donation|contribution|choice|answer|decision|amount|offer)"
        r"(?:\s+amount)?\s*(?:is|would\s+be|will\s+be|[:=])",
        r"\bthe\s+amount\s+(?:that\s+)?(?:you|i)\s+(?:would\s+|will\s+)?(?:contribute|put\s+in|give|donate)"
        r"(?:\s+to\s+the\s+(?:fund|pool|party\s+fund))?\s+is",
        r"\b(?:final\s+)?answer\s*(?:is\s*)?[:=]",
        r"\bthe\s+(?:final\s+)?answer\s+is",
    ]
)
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen twenty").split()
# a number word counts only as an amount of dollars ("five dollars", not "two reasons"); "nothing" is 0
_WORD_AMOUNT = rf"(nothing)\b|({'|'.join(_WORDS)})\s+(?:dollars?|bucks)\b"
_CONTRIB = re.compile(
    rf"(?:{_CONTRIB_PHRASES})\s+(?:in\s+|into\s+(?:the\s+(?:party\s+)?fund\s+)?)?(?:all\s+(?:of\s+)?(?:my\s+|the\s+)?)?"
    rf"(?:only\s+|just\s+|exactly\s+)?(?:{_AMOUNT}|{_WORD_AMOUNT})",
    re.I,
)


def _amount(m: re.Match) -> float:
    digits, nothing, word = m.groups()
    if digits is not None:
        return float(digits)
    return 0.0 if nothing else float(_WORDS.index(word.lower()))
_LEADING_NUMBER = re.compile(r"^[\s*_`'\"(\[]*" + _NUMBER)
_FINAL_NUMBER = re.compile(r"[ \t*_`'\"(\[]*" + _NUMBER + r"[ \t*_`'\")\]]*(?:dollars?)?[ \t.!*]*", re.I)


def parse_contribution(text: str | None, endowment: int) -> float | None:
    """A contribution in [0, endowment] (any amount, e.g. 7.5), or None (invalid). See the module docstring."""
    if not text:
        return None
    m = _LEADING_NUMBER.match(text)
    if m:
        values = {float(m.group(1))}
    else:
        values = {_amount(m) for m in _decisive(_CONTRIB, text)}
        if not values:
            m = _FINAL_NUMBER.fullmatch(_last_line(text))
            values = {float(m.group(1))} if m else set()
    if len(values) != 1:
        return None
    value = values.pop()
    if not 0 <= value <= endowment:
        return None
    return value + 0.0  # -0.0 -> 0.0

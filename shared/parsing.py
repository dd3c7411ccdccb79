"""Turning a response into an answer: `C`, `D`, or invalid (None); a PGG contribution or invalid.

The C/D rule, in order (the first step that decides wins):
1. Leading answer: after stripping whitespace and markdown/quote/bracket decoration, the response
   starts with a standalone C or D (`'  C'`, `'**D**'`, `'C.'`, `'D: because ...'`, `'(C)'`).
2. Explicit choice: the first phrase like "I choose C", "my choice is D", "strategy C",
   "option D", "answer: C", "go with C", "opt for D" (case-insensitive verbs, the letter as a
   standalone token in either case).
3. Sole letter: otherwise, if exactly one of C/D appears as a standalone capital letter, that one.
Anything else - both letters with no decisive phrase, or neither - is invalid.
A standalone letter is one not glued to other letters or digits ("CD", "Cc", "C3" are not answers).

PGG: the first number that follows a contribution verb ("contribute 7", "put $5 in"), else a number
at the very start of the response, else the first number in the text when it is the only one; it
must be an integer in [0, endowment], otherwise invalid.
"""

from __future__ import annotations

import re

_DECORATION = "*_`'\"()[]{}<>#>~ \t\r\n"
_LEADING = re.compile(r"^(?:answer|choice|decision|strategy|option|letter)?\s*[:\-=]?\s*([CD])(?![A-Za-z0-9])(?!\s*(?:and|or|&|/|,)\s*[CD](?![A-Za-z0-9]))", re.I)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([CD])(?![A-Za-z0-9])")
_CHOICE_LEAD = "|".join(
    [
        r"\bi\s+(?:would\s+|will\s+|'d\s+|'ll\s+)?(?:choose|chose|pick|select|opt\s+for|go\s+with|play|take)",
        r"\bmy\s+(?:final\s+)?(?:choice|answer|decision|pick|strategy)\s+(?:is|would\s+be|will\s+be)",
        r"\b(?:final\s+)?(?:answer|choice|decision)\s*(?:is)?\s*[:=]",
        r"\b(?:choose|choosing|chose|select|selecting|opt\s+for|opting\s+for|go\s+with|going\s+with)",
        r"\b(?:strategy|option|letter)",
    ]
)
_CHOICE = re.compile(
    rf"(?:{_CHOICE_LEAD})\s*[*_`'\"(\[]*\s*(?:strategy\s+|option\s+|letter\s+)?[*_`'\"(\[]*([CcDd])(?![A-Za-z0-9])",
    re.I,
)


def parse_choice(text: str | None) -> str | None:
    """`C`, `D` or None (invalid). See the module docstring for the rule."""
    if not text:
        return None
    head = text.lstrip(_DECORATION)
    m = _LEADING.match(head)
    if m:
        return m.group(1).upper()
    m = _CHOICE.search(text)
    if m:
        return m.group(1).upper()
    letters = {m.group(1) for m in _STANDALONE.finditer(text)}
    if len(letters) == 1:
        return letters.pop()
    return None


_NUMBER = r"\$?\s*(-?\d+(?:\.\d+)?)"
_CONTRIB = re.compile(
    r"\b(?:contribute|contributing|contributed|put|putting|give|giving|donate|donating|invest|investing|add|adding)"
    r"\s+(?:in\s+|into\s+)?(?:all\s+)?(?:of\s+)?(?:my\s+|the\s+)?" + _NUMBER,
    re.I,
)
_LEADING_NUMBER = re.compile(r"^[\s*_`'\"(\[]*" + _NUMBER)
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER)


def parse_contribution(text: str | None, endowment: int) -> int | None:
    """A whole contribution in [0, endowment], or None (invalid)."""
    if not text:
        return None
    m = _CONTRIB.search(text) or _LEADING_NUMBER.match(text)
    if m is None:
        numbers = _ANY_NUMBER.findall(text)
        if len(set(numbers)) != 1:
            return None
        value = numbers[0]
    else:
        value = m.group(1)
    number = float(value)
    if not number.is_integer() or not 0 <= number <= endowment:
        return None
    return int(number)

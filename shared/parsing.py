"""Turning a response into an answer: `C`, `D`, or invalid (None); a PGG contribution or invalid.

The rule reads what a careful person reads: the answer the response states as the player's own decision, and
nothing where it states none or contradicts itself. Decisions are recognised by one small grammar of decisions
(named pieces composed below), not by a list of phrases seen in some model's outputs. Measured against
hand-labelled responses in `tests/test_parser_labelled.py` (numbers there and in README.md).

THE STEPS (the first that decides wins)
1. Leading answer: the response starts (after whitespace and markdown/quote/bracket decoration) with a
   standalone C or D ("  C", "**D**", "C.", "(C)", "Answer: C", "Strategy D"; not "C and D"/"C or D"/"C/D") or
   with an amount (after `\\s*_\\`'"([` and an optional `$`; not a percentage or the start of arithmetic:
   "4.5 * 10", "10 x 2.5", "2 + 3"); an out-of-range leading amount makes the response invalid. Exact mode reads
   only this step (`_LEADING`, `_LEADING_NUMBER`, `_DECORATION`, imported by services/teacher/exact.py).
   A speaker tag of one or two capitalised words before it is read the same way ("Alex: C", "**Assistant:** D";
   for an amount only when the amount ends its clause: "Alex: 7." but not "Alex: 7 people ...").
2. Decisive statements (the grammar below), all of the deciding tier naming the same answer, in range.
3. The last line is just the letter or amount (decorated: "**6**", "$6", "6 dollars", "$\\boxed{6}$"), or for
   C/D ends with the letter after a comma or colon ("Considering everything, C."; not "C, D").
Otherwise invalid - both letters with no decisive statement, letters only in payoffs, option lists or
hypotheticals, no answer, an out-of-range amount. Invalid answers are counted, never dropped.

THE GRAMMAR OF A DECISION (step 2)
  first person  SUBJECT CHAIN VERB OBJECT   "I choose C", "As Alex, I'd go with option D", "I would like to
                                            donate 5 points", "I have decided to contribute $7", "I'm going to
                                            keep 3" (= endowment - 3), "Let's go with C"; a second verb of the
                                            same subject ("I'll keep 3 and contribute 7"); "I won't give
                                            anything" is 0
  nominal       my/our ADJ NOUN [PP] COPULA [to VERB] OBJECT    "my final choice is **D**", "As Alex, my choice
                                            of donation is 7", "my contribution to the fund would be $6", "my plan
                                            is to give 4"; reversed: "C is my choice", "$7 would be my contribution"
  label         [final] answer/choice/decision/conclusion MARK [VERB] OBJECT ("Answer: C", "**Decision:**
                contribute $7", "Final decision - D"); "the (final) answer is OBJECT"; opening a line:
                contribution/donation/amount (to contribute) MARK OBJECT, strategy/move/option/vote MARK OBJECT,
                a heading "## Decision" above [VERB] OBJECT, a line that is only VERB OBJECT ("**Contribute $7**",
                "Choose C"), "Letter 'C'"
  advice        you ADVICE VERB OBJECT      "you should choose D", "you'd better contribute 0"; past "you chose
                D"; for the PGG also the plain present ("you put $1 in the fund": the prompt calls the player
                "you")
  impersonal    the ADJ NOUN COPULA [to VERB] OBJECT    "the best strategy is D", "the wisest choice would be to
                contribute $5"; "... is to VERB OBJECT", "it is best to VERB OBJECT"; reversed "D is the best
                option"; a praised gerund: "Choosing C is the best option", "Contributing $6 seems fair"

  SUBJECT  I (anywhere: "As Alex, I", "**Alex:** I", "Thinking it over, I"), let's / let me.
  CHAIN    up to four of: would, will, shall, should, must, do, 'd, 'll; am, 'm, be, have, 've, feel; like/love/
           prefer/want/wish/intend/plan/aim/decide(d)/choose/chose/opt(ed)/elect/need/have/try/mean/hope + to;
           going/willing/happy/ready/prepared/inclined/comfortable/about (to); go ahead and; start by; end up;
           adverbs (therefore, then, so, also, definitely, probably, ultimately, personally, rather, ...).
           "not"/"never", "could", "might", "can" are not in it: "I would not choose D", "I could give 10" are
           no decisions.
  ADVICE   should, must, need to, have to, ought to, had better, would, will, 'd, 'll.
  VERB     choosing: choose, pick, select, opt for, go with, stick with, settle on, decide on, vote for (C/D
           also play, take); giving: donate, contribute, give, put (in), invest, offer, allocate, pledge, send,
           provide, commit, place, chip in, transfer, deposit; keeping (PGG): keep, retain, hold back, withhold -
           "keep K" is a contribution of endowment - K. Every inflection (choose/chooses/chose/chosen/choosing).
  OBJECT   C/D: the letter after decoration, "the", "strategy"/"option"/"letter"/"action", "(to) cooperate"/
           "(to) defect"; any other standalone capital letter is another answer (so invalid); not "C and D",
           "C or D", "C/D", "C, D".
           PGG: an amount, optionally after a place ("put into the fund $5") and after only/just/exactly/about/
           around/all of my/my entire: a number ("7", "$7.50", "$\\boxed{7}$", "7 and a half"), not a percentage,
           not the start of arithmetic, not a range or alternative ("5 or 6", "$5-$7"); a number word up to
           twenty that a unit or the end of its clause follows ("seven", "five dollars"; "I will give two
           reasons" is none), "a dollar"; a unit after it: dollars, bucks, points, units, tokens, coins,
           credits, cents (hundredths); "nothing"/"none"/"no money"/"not a cent" (0); "everything"/"it all"/
           "all (of it/of my money)"/"my entire endowment"/"the maximum" (the endowment); "half (of it/of my
           money)" (half the endowment).
  NOUN     choice, answer, decision, pick, strategy, move, option, vote, selection, response, action, plan,
           intention, verdict; PGG also donation, contribution, offer, pledge, investment, allocation, amount.
  COPULA   is, was, remains, stays, would/will/shall/must/should be, is going to be, goes to, 's, ":", "=", "-".
  MARK     ":", "=", " - " (after optional markdown: "**Decision:**").

WHICH STATEMENTS COUNT
- Not in a conditional sentence: a condition word before the statement in its sentence or clause - if, when,
  whenever, suppose, assume, unless, in case, imagine, let's say, for example, hypothetically, what happens,
  "say I/you ...", "Scenario 2:"/"Case 1:"/"Option A:" ("If I choose C, ..." is an outcome, not a decision).
  A clause after ", but"/", so"/", however"/";"/"but since" starts afresh; "even if" (a concession) and "if
  I were you" (advice) are no conditions; a condition word further back than 400 characters does not count.
- Not followed in its own clause by a condition: if, unless, provided, as long as, assuming, only if, in case
  ("I would give $10 if the others did"), nor in a question ("Should I contribute $10?").
- Present-tense "you choose C" is how the prompts state outcomes and never counts, nor "you could/can choose".
- Tiers: the player's own statements (first person, nominal, labels) outrank advice and impersonal ones: "The
  rational choice is D, but I choose C" is C. All statements of the deciding tier must name the same answer:
  "I will choose C. On reflection I will choose D" and "I'll give $7. My final answer: $6" are invalid.

LIMITS (what the grammar does not read)
- A decision without a frame above: "7 it is.", "Alex donates 7" (the player in the third person), "I'm in
  for $5", "we should all give 10" (a group), "I'll cooperate" without the letter (the 2x2 prompts name the
  strategies only by letter).
- Percentages and fractions of the endowment ("50 % of my money", "7/10"), number words above twenty or
  compound ("twenty-five"), "half a dollar", an answer that is only the result of arithmetic.
- Deliberation that states two decisions ("I'd give $10 ... no, I'll give $5") is invalid, as is any
  contradiction; a decision stated only in a negation is none, except "not ... anything/any money/a cent" (0).
- Decimal commas ("7,5") are not amounts; a standalone letter is one not glued to other letters or digits
  ("CD", "Cc", "C3" are not answers).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

# ---------------------------------------------------------------------------------------------------------------
# Step 1: the leading answer (exact mode imports these three; keep them as they are)
_DECORATION = "*_`'\"()[]{}<>#>~ \t\r\n"
_LEADING = re.compile(r"^(?:answer|choice|decision|strategy|option|letter)?\s*[:\-=]?\s*([CD])(?![A-Za-z0-9])(?!\s*(?:and|or|&|/|,)\s*[CD](?![A-Za-z0-9]))", re.I)
# an amount: "$7.50", "7"; not a percentage, not the start of arithmetic ("4.5 * 10", "10 x 2", "10 \times 2")
_ARITHMETIC = r"[ \t]*(?:[×/+=≈^]|\*(?!\*)|\\times|\\cdot|x[ \t]*\d)"
_NUMBER = r"\$?\s*(-?\d+(?:\.\d+)?)(?!\d|\.\d)(?![ \t]*%)(?!" + _ARITHMETIC + ")"
_LEADING_NUMBER = re.compile(r"^[\s*_`'\"(\[]*" + _NUMBER)

# a speaker tag before the leading answer: "Alex: C", "**Assistant**: 7" (one or two capitalised words)
_SPEAKER = re.compile(r"^[\s*_`'\"(\[>#]*(?-i:[A-Z][A-Za-z]+(?:[ \t][A-Z][A-Za-z]+)?)[*_\])]*[ \t]*:[*_]*[ \t]*")


def _alt(*parts: str) -> str:
    return "(?:" + "|".join(parts) + ")"


def _words(text: str) -> str:
    """'choose chose opt_for' -> an alternation of these whole words; "_" is any whitespace."""
    return _alt(*(w.replace("_", r"\s+") for w in text.split())) + r"\b"


# ---------------------------------------------------------------------------------------------------------------
# Step 2: the grammar's pieces
_I = r"\bi(?:\s+|(?=['’]))"                    # "I choose", "I'd", "I’ll"
_YOU = r"\byou(?:\s+|(?=['’]))"
_LETS = r"\blet(?:['’]s|\s+us|\s+me)\s+"  # "Let's go with C", "let me put $5 in"
_MY = r"\b(?:my|our)\s+"
_AP = r"['’]"
_ADVERB = _words("therefore thus hence then so also now probably definitely certainly surely still personally "
                 "ultimately finally eventually actually rather instead gladly happily simply likely confidently "
                 "really honestly again always generally realistically comfortably just only")
_STEP = _alt(
    rf"(?:would|will|shall|should|must|do|does|did|{_AP}d|{_AP}ll)\s+",
    rf"(?:am|{_AP}m|feel|be|have|{_AP}ve|had)\s+",
    r"(?:like|love|prefer|want|wish|intend|plan|aim|decide|decided|choose|chose|chosen|opt|opted|elect|elected"
    r"|need|have|has|had|try|tried|mean|hope)\s+to\s+",
    r"(?:going|gonna|willing|happy|ready|prepared|inclined|comfortable|content|glad|about|planning|deciding"
    r"|choosing|opting)\s+(?:to\s+)?",
    r"go(?:ing)?\s+ahead\s+(?:and\s+)?", r"(?:start|started|end|ended)\s+(?:up\s+)?(?:by\s+)?",
    rf"{_ADVERB}\s*,?\s+",
)
_CHAIN = rf"(?:{_STEP}){{0,4}}"
_ADVICE = (rf"(?:should|must|need\s+to|have\s+to|ought\s+to|(?:had|{_AP}d)\s+better|would|will|{_AP}d|{_AP}ll)\s+"
           r"(?:(?:definitely|always|probably|certainly|therefore|then|also|just|only|simply)\s+)?")

_CHOOSE = _words("choose chooses chose chosen choosing pick picks picked picking select selects selected selecting "
                 "opt_for opts_for opted_for opting_for go_with goes_with went_with gone_with going_with "
                 "stick_with sticks_with stuck_with sticking_with settle_on settled_on settling_on "
                 "decide_on decided_on vote_for voted_for")
_PLAY = _words("play plays played playing take takes took taking")  # C/D only ("I'd take 5" is no amount)
_GIVE = _words("donate donates donated donating contribute contributes contributed contributing give gives gave "
               "given giving put puts putting invest invests invested investing offer offers offered offering "
               "allocate allocates allocated allocating pledge pledges pledged pledging send sends sent sending "
               "provide provides provided providing commit commits committed committing place places placed "
               "placing chip_in chips_in chipped_in transfer transfers transferred deposit deposits deposited")
_KEEP = _words("keep keeps kept keeping retain retains retained retaining hold_back holds_back held_back "
               "withhold withholds withheld")

_NOUN_CHOICE = _words("choice answer decision pick strategy move option vote selection response action plan "
                      "intention verdict")
_NOUN_GIVE = _words("donation contribution offer pledge investment allocation amount")
_ADJ = (r"(?:(?:final|chosen|preferred|ultimate|decided|proposed|planned|intended|definitive|own|best|actual)"
        r"\s+)*")
_IMPERSONAL_ADJ = _words("best better optimal right final correct rational wise wisest smart smartest ideal sensible "
                         "logical reasonable fair obvious recommended dominant safest essential advisable")
_PP = r"(?:\s+(?:of|for|to|toward|towards|into|in|on|regarding|about|here)\b[^.!?\n:;]{0,40}?)?"
_COPULA = (r"\s*(?:(?:(?:is|was|remains|stays)(?:\s+going\s+to\s+be)?|(?:would|will|shall|must|should)"
           r"(?:\s+(?:therefore|then|also|still|thus))?\s+be|goes\s+to)\b"
           r"(?:\s+(?:therefore|then|simply|clearly|definitely|still|thus|obviously|certainly))?"
           rf"|{_AP}s\b|[:=]|-(?!\d))\s*")
_LINE_START = r"(?:^|\n)[ \t>*#_\-]*"
_LABEL_MARK = r"[*_]*\s*(?:[:=]|\s[-–—](?=\s))"  # "Answer: C", "**Decision:** C", "Final decision - D"

# the C/D object: the letter after decoration, "the", "strategy"/"option"/"letter", "to cooperate"
_LETTER = (
    r"(?:[\s:=]|[-–—](?=\s))*(?:(?:to\s+)?(?:cooperate|defect)\s*)?[*_`'\"(\[]*\s*(?:the\s+)?"
    r"(?:(?:strategy|option|letter|action|choice|move)\s+)?[*_`'\"(\[]*"
    r"(?-i:(?P<letter>[A-Z]|[cd]))(?![A-Za-z0-9])(?!\s*(?:and|or|&|/|,)\s*[CDcd](?![A-Za-z0-9]))"
)

# the PGG object: an amount
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen twenty").split()


_UNIT_WORDS = r"(?:dollars?|bucks?|points?|units?|tokens?|coins?|credits?|usd|cents?)\b"


def _unit(n: int) -> str:
    """A unit after an amount; hundredths when it is cents (group `cents<n>`)."""
    return rf"(?:dollars?|bucks?|points?|units?|tokens?|coins?|credits?|usd|(?P<cents{n}>cents?))\b"


def _half_more(n: int) -> str:
    return rf"(?P<half_more{n}>\s+and\s+a\s+half)?"


_MONEY = r"(?:money|endowment|funds?|cash|dollars|points|tokens|coins|allowance|stake|savings)"
# what may follow a number word or "all" for it to be an amount ("I will give two reasons" is none)
_CLAUSE_END = (r"(?=\s*(?:[.,;:!?)\]*\n]|$)|\s+(?:to|into|in|toward|towards|for|out|from|and|because|since|as|so"
               rf"|now|this|here|then|which|with|-|—)\b|\s+of\s+(?:my|the|our)\s+(?:\$?\d|\w+\s+dollars|{_MONEY}))")
# a number that is no amount: a percentage, the start of arithmetic, a range or alternative ("5 or 6", "$5-$7")
_NOT_AN_AMOUNT = (rf"(?!\d|\.\d|,\d)(?![ \t]*(?:%|percent|times\b|multiplied\b))(?!{_ARITHMETIC})"
                  rf"(?!(?:\s*{_UNIT_WORDS})?\s*(?:or|to|-|–|—)\s*\$?\d)")
_QUANTITY = (r"(?:(?:only|just|exactly|precisely|about|around|roughly|approximately|a\s+total\s+of|the\s+sum\s+of"
             r"|an\s+amount\s+of|a\s+(?:contribution|donation)\s+of|all\s+(?:of\s+)?(?:my\s+|the\s+)?"
             r"|(?:my|the)\s+(?:entire|full|whole)\s+)\s*)?")
_AMOUNT = (
    r"(?:[\s:=]|[-–—](?=\s))*[*_`'\"(\[]*\s*" + _QUANTITY + r"[*_`'\"(\[]*\s*" + _alt(
        # a number: "$7.50", "$\boxed{7}$", "7 dollars", "7 and a half", "50 cents"
        rf"(?:\$\s*)?(?:\\boxed\{{\s*)?(?P<num>-?\d+(?:\.\d+)?){_NOT_AN_AMOUNT}{_half_more(1)}"
        rf"(?:\s*\}}?\$?\s*{_unit(1)})?",
        # a number word: "seven", "five dollars" (a unit or the end of the clause must follow), "a dollar"
        rf"(?P<word>{'|'.join(_WORDS)})\b{_half_more(2)}(?:\s+{_unit(2)}|{_CLAUSE_END})",
        rf"(?P<one>an?|a\s+single|one\s+single)\s+(?:dollar|buck|point|unit|token|coin|credit|(?P<cent>cent))\b",
        # nothing, everything, half
        r"(?P<zero>nothing|none|no\s+money|not\s+(?:a\s+)?(?:single\s+)?(?:cent|dollar|penny|thing))\b",
        rf"(?P<all>everything|it\s+all|all\s+(?:of\s+)?(?:it|(?:my|the)\s+{_MONEY})"
        rf"|(?:my|the)\s+(?:entire|full|whole)\s+(?:{_MONEY}|amount|sum)|the\s+(?:maximum|max|full\s+amount)"
        rf"|all{_CLAUSE_END})\b",
        rf"(?P<half>half)\b(?!\s+(?:a|an)\b)(?:\s+(?:of\s+)?(?:it|(?:my|the)\s+{_MONEY}|what\s+i\s+have))?",
    )
)
_PLACE = r"(?:\s*(?:in|into|to|toward|towards)\s+(?:the\s+|my\s+|our\s+)?(?:[\w-]+\s+){0,2}?(?:fund|pot|pool|kitty))?"
_GIVE_OBJECT = rf"(?:\s+in\b)?{_PLACE}{_AMOUNT}"


# the reverse order: "C is my choice", "$7 would be my contribution", "D is the best option"
_IS = (r"[*_`'\")\]]*\s+(?:is|would\s+be|will\s+be|remains|seems\s+(?:like\s+|to\s+be\s+)?)\s*"
       r"(?:(?:definitely|clearly|therefore|still|simply|obviously|certainly)\s+)?")
_LETTER_FIRST = r"(?<![A-Za-z0-9])(?-i:(?P<letter>[CD]))"
_AMOUNT_FIRST = rf"(?<![\w.$])(?:\$\s*)?(?P<num>\d+(?:\.\d+)?)(?:\s*{_unit(1)})?"
_IMPERSONAL = rf"the\s+{_IMPERSONAL_ADJ}\s+"
# a gerund's praise: "Contributing $6 seems like a fair compromise", "Choosing C is the best option"
_PRAISE = _words("best better optimal right correct rational wise wisest smart smartest ideal sensible logical "
                 "reasonable fair good balanced safest safe prudent dominant")
_PRAISED = (rf"[*_`'\")\]]*\s+(?:is|seems|feels|sounds|would\s+be|will\s+be)\s+(?:like\s+|to\s+be\s+)?"
            rf"(?:(?:the|a|an|my)\s+)?(?:most\s+\w+|(?:very|quite|really)\s+{_PRAISE}|{_PRAISE})"
            r"(?:\s+(?:choice|option|decision|balance|compromise|plan|approach|move|strategy|bet|amount|contribution)\b"
            r"|(?=\s*[.,;!]|\s+(?:for|here|to\s+me|because|since)\b))")


def _compile(*groups: tuple[int, str, list[str]]) -> list[tuple[int, str, re.Pattern]]:
    """(tier, kind, pattern) for every pattern of every (tier, kind, patterns) group."""
    return [(tier, kind, re.compile(p, re.I)) for tier, kind, patterns in groups for p in patterns]


_CHOOSE_OR_PLAY = f"(?:{_CHOOSE}|{_PLAY})"
_GIVE_OR_CHOOSE = f"(?:{_GIVE}|{_CHOOSE})"
# a verb may come between a label and its object: "Decision: choose C", "**Answer:** contribute $7"
_THEN_CHOOSE = rf"(?:\s*[*_]*\s*(?:to\s+)?{_CHOOSE_OR_PLAY})?"
_THEN_GIVE = rf"(?:\s*[*_]*\s*(?:to\s+)?{_GIVE_OR_CHOOSE}(?:\s+in\b)?{_PLACE})?"
_LINE_END = r"[ \t*_`'\")\].!]*(?=\n|$)"
# tier 1: the player's own statements; tier 2: advice and impersonal ones (used only where tier 1 says nothing)
_CHOICE_STATEMENTS = _compile(
    (1, "choose", [
        # first person
        rf"{_I}{_CHAIN}{_CHOOSE_OR_PLAY}{_LETTER}",
        rf"{_LETS}{_CHAIN}{_CHOOSE}{_LETTER}",
        rf"\bno\s+choice\s+but\s+to\s+{_CHOOSE}{_LETTER}",
        # nominal
        rf"{_MY}{_ADJ}{_NOUN_CHOICE}{_PP}{_COPULA}(?:to\s+{_CHAIN}{_CHOOSE_OR_PLAY})?{_LETTER}",
        rf"(?:{_MY}|\b(?:reasons?|reasoning|rationale)\s+(?:behind|for)\s+(?:the|my)\s+)(?:decision|choice)\s+to\s+"
        rf"{_CHOOSE}{_LETTER}",
        # labels
        rf"\b(?:final\s+)?(?:answer|choice|decision|conclusion|verdict|selection)\s*(?:is\s*)?{_LABEL_MARK}"
        rf"{_THEN_CHOOSE}{_LETTER}",
        rf"\bthe\s+(?:final\s+)?answer\s+(?:is|would\s+be|will\s+be){_LETTER}",
        rf"\b(?:chosen|selected|preferred)\s+(?:strategy|option|action|move)\s*[*_]*\s*[:=]{_LETTER}",
        rf"{_LINE_START}(?:final\s+)?(?:answer|choice|decision|conclusion)[ \t*_#:]*\n{_THEN_CHOOSE}{_LETTER}",
        rf"{_LINE_START}{_CHOOSE_OR_PLAY}{_LETTER}{_LINE_END}",  # a line that is just "**Choose C**"
        rf"{_LINE_START}(?:(?:my|our)\s+)?(?:(?:final|chosen|preferred)\s+)?"
        rf"(?:strategy|move|action|option|pick|vote|selection|play)\s*{_LABEL_MARK}{_THEN_CHOOSE}{_LETTER}",
        rf"\bthe\s+decision\s+is\s+based\s+on{_LETTER}",
        rf"{_LINE_START}letter\s*[:=]?{_LETTER}",
        rf"{_LETTER_FIRST}{_IS}{_MY}{_ADJ}{_NOUN_CHOICE}",
    ]),
    (2, "choose", [
        # advice
        rf"{_YOU}{_ADVICE}{_CHOOSE_OR_PLAY}{_LETTER}",
        r"\byou\s+" + _words("chose picked selected opted_for went_with") + _LETTER,
        # impersonal
        rf"\bthe\s+(?:{_IMPERSONAL_ADJ}\s+)?(?:choice|answer|decision|strategy|option|move|action)"
        rf"(?:\s+(?:for\s+me|here|for\s+us))?\s+(?:is|would\s+be|will\s+be)\s+(?:to\s+{_CHOOSE_OR_PLAY})?{_LETTER}",
        rf"\bis\s+to\s+{_CHOOSE_OR_PLAY}{_LETTER}",
        rf"\b{_IMPERSONAL_ADJ}\s+to\s+{_CHOOSE_OR_PLAY}{_LETTER}",
        rf"{_LETTER_FIRST}{_IS}{_IMPERSONAL}(?:choice|answer|decision|strategy|option|move|action)",
        rf"\b{_words('choosing picking selecting playing going_with opting_for sticking_with')}{_LETTER}{_PRAISED}",
    ]),
)

# the second of two coordinated verbs of one first-person subject: "I'll keep 3 [for myself] and contribute 7"
_COORDINATED = rf"{_I}{_CHAIN}(?:{_GIVE}|{_KEEP}|{_CHOOSE})[^.!?\n;]{{0,60}}?\b(?:and|then)\s+{_CHAIN}"
_INFINITIVE_GIVE = rf"(?:to\s+{_CHAIN}{_GIVE_OR_CHOOSE}(?:\s+in\b)?{_PLACE})?"
_CONTRIBUTION_STATEMENTS = _compile(
    (1, "give", [
        # first person
        rf"{_I}{_CHAIN}{_GIVE}{_GIVE_OBJECT}",
        rf"{_I}{_CHAIN}{_CHOOSE}{_AMOUNT}",
        rf"{_LETS}{_CHAIN}{_GIVE}{_GIVE_OBJECT}",
        rf"{_LETS}{_CHAIN}{_CHOOSE}{_AMOUNT}",
        rf"{_COORDINATED}{_GIVE}{_GIVE_OBJECT}",  # "I'll keep 3 and contribute 7"
        # nominal
        rf"{_MY}{_ADJ}(?:{_NOUN_CHOICE}|{_NOUN_GIVE})(?:\s+amount)?{_PP}{_COPULA}{_INFINITIVE_GIVE}{_AMOUNT}",
        rf"\bthe\s+amount\s+(?:that\s+)?{_I}{_CHAIN}{_GIVE}(?:\s+in)?{_PLACE}\s+(?:is|would\s+be|will\s+be){_AMOUNT}",
        # labels
        rf"\b(?:final\s+)?(?:answer|choice|decision|conclusion)\s*(?:is\s*)?{_LABEL_MARK}{_THEN_GIVE}{_AMOUNT}",
        rf"\bthe\s+(?:final\s+)?answer\s+(?:is|would\s+be|will\s+be){_AMOUNT}",
        rf"{_LINE_START}(?:(?:final|chosen|my|our|proposed)\s+)?{_NOUN_GIVE}(?:\s+amount)?"
        rf"(?:\s+to\s+(?:contribute|donate|give|put\s+in|invest))?(?:\s+to\s+the\s+(?:[\w-]+\s+)?fund)?[ \t*_]*[:=]"
        + _AMOUNT,
        rf"{_LINE_START}(?:final\s+)?(?:answer|choice|decision|contribution|donation)[ \t*_#:]*\n{_THEN_GIVE}"
        + _AMOUNT,
        rf"{_LINE_START}{_GIVE_OR_CHOOSE}{_GIVE_OBJECT}{_PLACE}{_LINE_END}",  # a line that is just "**Contribute $7**"
        rf"{_AMOUNT_FIRST}{_IS}{_MY}{_ADJ}(?:{_NOUN_GIVE}|{_NOUN_CHOICE})",
    ]),
    (1, "keep", [
        rf"{_I}{_CHAIN}{_KEEP}{_AMOUNT}",
        rf"{_COORDINATED}{_KEEP}{_AMOUNT}",  # "I'll contribute 7 and keep 3"
        rf"{_MY}{_ADJ}{_NOUN_CHOICE}{_PP}{_COPULA}to\s+{_CHAIN}{_KEEP}{_AMOUNT}",
    ]),
    (1, "none", [  # "I won't give anything"
        rf"{_I}(?:won{_AP}t|will\s+not|would\s+not|wouldn{_AP}t|do\s+not|don{_AP}t|(?:am|{_AP}m)\s+not\s+going\s+to"
        rf"|shall\s+not)\s+{_GIVE}\s+(?:anything|any\s+money|a\s+(?:single\s+)?(?:cent|dollar|penny))\b",
    ]),
    (2, "give", [
        # advice, and the plain present ("you put $1 in the fund")
        rf"{_YOU}(?:{_ADVICE})?(?:only\s+|just\s+)?{_GIVE}{_GIVE_OBJECT}",
        rf"{_YOU}{_ADVICE}{_CHOOSE}{_AMOUNT}",
        rf"\bthe\s+amount\s+(?:that\s+)?{_YOU}{_CHAIN}{_GIVE}(?:\s+in)?{_PLACE}\s+(?:is|would\s+be|will\s+be){_AMOUNT}",
        # impersonal
        rf"\bthe\s+{_IMPERSONAL_ADJ}\s+(?:choice|decision|strategy|option|move|contribution|amount|donation"
        rf"|course\s+of\s+action|thing\s+to\s+do)(?:\s+(?:for\s+me|here|for\s+us))?\s+"
        rf"(?:is|would\s+be|will\s+be)\s*{_INFINITIVE_GIVE}{_AMOUNT}",
        rf"\bis\s+to\s+{_GIVE_OR_CHOOSE}{_GIVE_OBJECT}",
        rf"\b{_IMPERSONAL_ADJ}\s+to\s+{_GIVE_OR_CHOOSE}{_GIVE_OBJECT}",
        rf"{_AMOUNT_FIRST}{_IS}{_IMPERSONAL}(?:choice|decision|strategy|option|move|contribution|amount|donation)",
        rf"\b{_words('contributing donating giving putting investing offering choosing going_with')}"
        rf"(?:\s+in\b)?{_PLACE}{_AMOUNT}{_PLACE}{_PRAISED}",
    ]),
    (2, "keep", [rf"{_YOU}{_ADVICE}{_KEEP}{_AMOUNT}"]),
)

# ---------------------------------------------------------------------------------------------------------------
# which statements count: not conditional, not a question
_CONDITIONAL = re.compile(
    r"\b(?:(?<!even\s)if(?!\s+i\s+were\s+(?:you|in\s+your))|when|whenever|suppose|supposing|assume|assuming|unless"
    r"|in\s+case|imagine|let['’]?s\s+say|for\s+example|hypothetically|what\s+happens"
    r"|say(?=\s+(?:i|you|we|everyone|everybody|all|each)\b)"  # "Say I contribute $5, then ..."
    r"|(?:scenario|case|option|possibility|alternative|outcome)\b[^.\n:]{0,12}:)",  # "Scenario 2: I contribute $0"
    re.I)
# the start of the sentence a match is in: the last sentence end (not a decimal point) or line break before it
# (a clause that follows ", but" or ";" starts afresh: "I would give $10 if ..., but since I can't, I'll give $5")
_SENTENCE_END = re.compile(r"[.!?](?!\d)|\n|;|,\s*(?:but|however|yet|so|therefore|thus|hence|instead|otherwise)\b"
                           r"|\bbut\s+(?:since|because|given|as)\b", re.I)
_SENTENCE_MAX = 400  # a conditional word further back than this does not count (keeps parsing linear in the text)
# the rest of the clause after an object makes it conditional: "I would give $10 if the others did"
_CONDITION_AFTER = re.compile(
    r"[ \t,]*(?:(?!(?:because|since|as|so|and|but|while|which|that|given|though|although|even)\b)"
    r"[\w$'’-]+[ \t]+){0,5}?"
    r"(?:if|unless|provided|as\s+long\s+as|assuming|only\s+if|in\s+case)\b", re.I)
_QUESTION = re.compile(r"[^.!?\n]*?\?")


def _decisive(pattern: re.Pattern, text: str, ends: list[int], conditions: list[int]) -> list[re.Match]:
    """The matches of `pattern` that count: not in a conditional sentence or clause, not in a question."""
    found = []
    for m in pattern.finditer(text):
        begin = ends[bisect_right(ends, m.start()) - 1] if ends and ends[0] <= m.start() else 0
        begin = max(begin, m.start() - _SENTENCE_MAX)
        i = bisect_left(conditions, begin)  # a conditional word in [begin, m.start()) makes the sentence conditional
        if i < len(conditions) and conditions[i] < m.start():
            continue
        if _CONDITION_AFTER.match(text, m.end()) is None and _QUESTION.match(text, m.end()) is None:
            found.append(m)
    return found


def _statements(statements, text: str, value) -> set:
    """The values of the decisive statements of the first tier that has any: the player's own (tier 1) before
    advice and impersonal ones (tier 2)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    conditions = [m.start() for m in _CONDITIONAL.finditer(text)]
    for tier in (1, 2):
        values = {value(kind, m) for t, kind, pattern in statements if t == tier
                  for m in _decisive(pattern, text, ends, conditions)}
        if values:
            return values
    return set()


def _last_line(text: str) -> str:
    return text.rstrip().rsplit("\n", 1)[-1]


# ---------------------------------------------------------------------------------------------------------------
# C/D

# the last line is just the letter, or ends with it after a comma/colon ("Considering everything, C."), not "C, D"
_FINAL_LETTER = re.compile(r"(?:.*(?<!\b[CD])[,:][ \t]*)?[ \t*_`'\"(\[]*([CD])[ \t*_`'\")\]]*[.!]?[ \t*]*")


def _leading_choice(text: str) -> str | None:
    m = _LEADING.match(text.lstrip(_DECORATION))
    return m.group(1).upper() if m else None


def parse_choice(text: str | None) -> str | None:
    """`C`, `D` or None (invalid). See the module docstring for the rule."""
    if not text:
        return None
    lead = _leading_choice(text)
    if lead is None and (speaker := _SPEAKER.match(text)):
        lead = _leading_choice(text[speaker.end():])
    if lead is not None:
        return lead
    named = _statements(_CHOICE_STATEMENTS, text, lambda kind, m: m.group("letter").upper())
    if named:
        return named.pop() if len(named) == 1 and named <= {"C", "D"} else None
    m = _FINAL_LETTER.fullmatch(_last_line(text))
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------------------------
# PGG

_FINAL_NUMBER = re.compile(r"[ \t*_`'\"(\[]*(?:\$\s*)?(?:\\boxed\{\s*)?" + _NUMBER + r"[ \t]*\}?\$?[ \t*_`'\")\]]*"
                           r"(?:dollars?|bucks|points?|units?|tokens?|coins?)?[ \t.!*]*", re.I)
_AMOUNT_ENDS_CLAUSE = re.compile(r"[ \t]*(?:dollars?|bucks|points?|units?|tokens?|coins?)?[ \t*_`'\")\]]*"
                                 r"(?:[.,;:!\n—-]|$)", re.I)


def _amount(m: re.Match, endowment: int) -> float:
    """The amount an _AMOUNT match names."""
    g = dict.fromkeys(("num", "word", "one", "cent", "zero", "all", "half_more1", "half_more2", "cents1", "cents2"))
    g.update(m.groupdict())
    if g["num"] is not None:
        value = float(g["num"])
    elif g["word"] is not None:
        value = float(_WORDS.index(g["word"].lower()))
    elif g["one"] is not None:
        value = 0.01 if g["cent"] else 1.0
    elif g["zero"] is not None:
        return 0.0
    elif g["all"] is not None:
        return float(endowment)
    else:  # half
        return endowment / 2
    if g["half_more1"] or g["half_more2"]:
        value += 0.5
    if g["cents1"] or g["cents2"]:
        value /= 100
    return value


def _leading_amount(text: str, whole_clause: bool = False) -> float | None:
    m = _LEADING_NUMBER.match(text)
    if m is None or (whole_clause and _AMOUNT_ENDS_CLAUSE.match(text, m.end()) is None):
        return None
    return float(m.group(1))


def parse_contribution(text: str | None, endowment: int) -> float | None:
    """A contribution in [0, endowment] (any amount, e.g. 7.5), or None (invalid). See the module docstring."""
    if not text:
        return None
    lead = _leading_amount(text)
    if lead is None and (speaker := _SPEAKER.match(text)):
        lead = _leading_amount(text[speaker.end():], whole_clause=True)
    if lead is not None:
        values = {lead}
    else:
        def value(kind: str, m: re.Match) -> float:
            if kind == "none":
                return 0.0
            amount = _amount(m, endowment)
            return endowment - amount if kind == "keep" else amount

        values = _statements(_CONTRIBUTION_STATEMENTS, text, value)
        if not values:
            m = _FINAL_NUMBER.fullmatch(_last_line(text))
            values = {float(m.group(1))} if m else set()
    if len(values) != 1:
        return None
    value = values.pop()
    if not 0 <= value <= endowment:
        return None
    return value + 0.0  # -0.0 -> 0.0

"""Turning a response into an answer: `C`, `D`, or invalid (None); a PGG contribution or invalid.

The rule reads what a careful person reads: the answer the response states as the player's own decision, and
nothing where it states none or contradicts itself. Decisions are recognised by one small grammar of decisions
(named pieces composed below), not by a list of phrases seen in some model's outputs. Measured against two
hand-labelled sets in `tests/test_parser_labelled.py` (the demo models' responses, and 340 responses in eight
other model families' styles labelled blind to the rule; numbers there and in README.md).

WHAT IS READ
The visible answer: a reasoning trace (<think>...</think>, also thinking/reasoning/scratchpad) is set aside -
read only when the rest states no answer - and LaTeX boxes (`$\\boxed{7}$` -> 7) and bold markers are dropped.

THE STEPS
1. Leading answer: the response starts (after whitespace and markdown/quote/bracket decoration) with a
   standalone C or D ("  C", "**D**", "C.", "(C)", "Answer: C", "Strategy D"; not "C and D"/"C or D"/"C/D") or
   with an amount (after `\\s*_\\`'"([` and an optional `$`; not a percentage or the start of arithmetic:
   "4.5 * 10", "10 x 2.5", "2 + 3"), for the PGG also an amount in words or a share that ends its clause
   ("Five dollars.", "Nothing.", "Half of my $10.", "All of it - $10!"); a speaker tag of one or two capitalised
   words may come first ("Alex: C", "Assistant: 7." - an amount there must end its clause). It is no answer when
   another answer follows it at once ("C (or D)", "$5-$10", "$5 - or maybe $6"; an apposition of the same
   amount is fine: "Half my endowment, $5") or a condition does ("C if they are trustworthy, D otherwise").
   Exact mode reads only the plain form of this step (`_LEADING`, `_LEADING_NUMBER`, `_DECORATION`, imported
   by services/teacher/exact.py, unchanged).
2. Decisive statements (the grammar below), ranked: 0 a self-correction or a final answer (a tier-1 statement
   after "actually"/"on reflection"/"on second thought"/"correction"/"I want to revise"/"changed my mind", or
   followed by "instead", or containing "final": "my final choice is D"; and a bare "Actually, D."), 1 the
   player's own statements (first person, nominal, labels), 2 advice and impersonal ones.
   With a leading answer: a rank-0 statement overrides it; a rank-1 statement naming another answer makes the
   response invalid (a contradiction); otherwise the leading answer stands. A leading answer that is a
   sentence's subject ("$0 is the individually rational answer ...", "C is better") counts as a rank-2
   statement instead. Without one: the statements of the first rank that has any, which must all name the same
   answer, in range ("I will choose C. I will choose D" is invalid; "The rational choice is D, but I choose C"
   is C). Where no statement counts, a decision stated in the consequent of two or more conditional sentences,
   the same in every case ("If they pick C, I pick C. If they pick D, I still pick C"), is the answer.
3. The last line is just the letter or amount (decorated: "**6**", "$6", "6 dollars"), or for C/D ends with the
   letter after a comma or colon ("Considering everything, C."; not "C, D").
Otherwise invalid - both letters with no decisive statement, letters only in payoffs, option lists or
hypotheticals, no answer, an out-of-range amount. Invalid answers are counted, never dropped.

THE GRAMMAR OF A DECISION (step 2)
  first person  SUBJECT CHAIN VERB OBJECT   "I choose C", "As Alex, I'd go with option D", "I would like to
                                            donate 5 points", "I have decided to contribute $7", "I'm going to
                                            keep 3" (= endowment - 3), "Let's go with C"; a second verb of the
                                            same subject ("I'll keep 3 and contribute 7"); "I won't give
                                            anything" is 0; "I will not choose D" is C (two strategies)
  nominal       my/our ADJ NOUN [PP] COPULA [to VERB] OBJECT    "my final choice is **D**", "As Alex, my choice
                                            of donation is 7", "my contribution to the fund would be $6", "my plan
                                            is to give 4"; reversed: "C is my choice", "$7 would be my
                                            contribution", "D is what I'd pick"
  label         [final] answer/choice/decision/conclusion MARK [VERB] OBJECT ("Answer: C", "Decision: contribute
                $7", "Final decision - D"); "the (final) answer is OBJECT"; opening a line: contribution/donation/
                amount (to contribute) MARK OBJECT, strategy/move/option/vote MARK OBJECT, a heading "## Decision"
                above [VERB] OBJECT, a line that is only VERB OBJECT ("Contribute $7", "Choose C"), "Letter 'C'"
  advice        you ADVICE VERB OBJECT      "you should choose D", "you'd better contribute 0"; past "you chose
                D"; for the PGG also the plain present ("you put $1 in the fund": the prompt calls the player
                "you")
  impersonal    the ADJ NOUN COPULA [to VERB] OBJECT    "the best strategy is D", "the wisest choice would be to
                contribute $5", "the best approach would be to choose C"; "... is to VERB OBJECT", "it is best to
                VERB OBJECT"; reversed "D is the best option"; a praised gerund: "Choosing C is the best option",
                "Contributing $6 seems fair"

  SUBJECT  I (anywhere: "As Alex, I", "Alex: I", "Thinking it over, I"), let's / let me.
  CHAIN    up to four of: would, will, shall, should, must, do, 'd, 'll; am, 'm, be, have, 've, feel; like/love/
           prefer/want/wish/intend/plan/aim/decide(d)/choose/chose/opt(ed)/elect/need/have/try/mean/hope + to;
           going/willing/happy/ready/prepared/inclined/comfortable/about (to); go ahead and; start by; end up;
           adverbs (therefore, then, so, also, definitely, probably, ultimately, personally, rather, ...).
           "could", "might", "can" are not in it: "I could give 10" is no decision; "not"/"never" only as above.
  ADVICE   should, must, need to, have to, ought to, had better, would, will, 'd, 'll.
  VERB     choosing: choose, pick, select, opt for, go with, stick with, settle on, decide on, vote for, adopt
           (C/D also play, take); giving: donate, contribute, give, put (in), invest, offer, allocate, pledge,
           send, provide, commit, place, chip in, transfer, deposit; keeping (PGG): keep, retain, hold back,
           withhold - "keep K" is a contribution of endowment - K. Every inflection (choose/chooses/chose/...).
  OBJECT   C/D: the letter after decoration, "the", "strategy"/"option"/"letter"/"action"/"policy"/"approach",
           "(to) cooperate"/"(to) defect"; any other standalone capital letter is another answer (so invalid);
           not "C and D", "C or D", "C/D", "C, D".
           PGG: an amount, optionally after a place ("put into the fund $5") and after only/just/exactly/about/
           around/all of my/my entire: a number ("7", "$7.50", "7 and a half"), not a percentage, not the start
           of arithmetic, not a range or alternative ("5 or 6", "$5-$7"); a number word up to twenty that a unit
           or the end of its clause follows ("seven", "five dollars"; "I will give two reasons" is none), "a
           dollar"; a unit after it: dollars, bucks, points, units, tokens, coins, credits, cents (hundredths);
           "nothing"/"none"/"no money"/"not a cent" (0); "everything"/"it all"/"all (of it/of my money)"/"my
           entire endowment"/"the maximum" (the endowment); "half"/"a quarter"/"a third"/... "of my money"/
           "of my endowment"/"of my $10", "70% of my endowment" (that share of the endowment); "everything
           except $1", "all but 2" (the endowment less that).
           An object is on the statement's line or on the next line, but not in a list that follows (a line
           "Decision:" above "- Strategy C: 10 points" is no decision).
  NOUN     choice, answer, decision, pick, strategy, move, option, vote, selection, response, action, plan,
           intention, verdict; PGG also donation, contribution, offer, pledge, investment, allocation, amount.
  COPULA   is, was, remains, stays, would/will/shall/must/should be, is going to be, goes to, 's, ":", "=", "-".
  MARK     ":", "=", " - " (after optional markdown: "**Decision:**").

WHICH STATEMENTS COUNT
- Not in a conditional sentence: a condition word before the statement in its sentence or clause - if, when,
  whenever, suppose, assume, unless, in case, imagine, let's say, for example, hypothetically, what happens,
  "say I/you ...", "Scenario 2:"/"Case 1:"/"Option A:" ("If I choose C, ..." is an outcome, not a decision;
  in the consequent - after a comma or "then" - it is a decision under that condition, see step 2). A clause
  after ", but"/", however"/";"/"but since" starts afresh; a condition inside parentheses reaches no further
  than them; "even if" (a concession) and "if I were you" (advice) are no conditions; a condition word further
  back than 400 characters does not count.
- Not followed in its own clause by a condition: if, unless, provided, as long as, assuming, only if, in case
  ("I would give $10 if the others did"), nor in a question ("Should I contribute $10?").
- Present-tense "you choose C" is how the prompts state outcomes and never counts, nor "you could/can choose".
  Game-theoretic descriptions ("the dominant strategy is D") are no impersonal decisions.

LIMITS (what the grammar does not read)
- A decision without a frame above: "7 it is.", the player in the third person ("Alex should contribute $10",
  "The athlete should pick D": other players are named the same way), "I'm in for $5", "we should all give
  10" (a group), "I'll cooperate" without the letter (the 2x2 prompts name the strategies only by letter).
- Alternatives offered for different parties ("C for the firms as a whole, but D for the individual firm").
- Percentages without "of my money/endowment", fractions written with digits ("7/10"), number words above
  twenty or compound ("twenty-five"), "half a dollar", an answer that is only the result of arithmetic.
- Deliberation that states two decisions without marking a correction ("I'd give $10 ... I'll give $5") is
  invalid, as is any contradiction; a decision stated only in a negation is none, except "not ... anything/any
  money/a cent" (0) and "not C/D" in a 2x2 game.
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
                 "decide_on decided_on vote_for voted_for adopt adopts adopted adopting")
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
                         "logical reasonable fair obvious recommended safest essential advisable")
_PP = r"(?:\s+(?:of|for|to|toward|towards|into|in|on|regarding|about|here)\b[^.!?\n:;]{0,40}?)?"
_COPULA = (r"\s*(?:(?:(?:is|was|remains|stays)(?:\s+going\s+to\s+be)?|(?:would|will|shall|must|should)"
           r"(?:\s+(?:therefore|then|also|still|thus))?\s+be|goes\s+to)\b"
           r"(?:\s+(?:therefore|then|simply|clearly|definitely|still|thus|obviously|certainly))?"
           rf"|{_AP}s\b|[:=]|-(?!\d))\s*")
_LINE_START = r"(?:^|\n)[ \t>*#_\-]*"
_LABEL_MARK = r"[*_]*\s*(?:[:=]|\s[-–—](?=\s))"  # "Answer: C", "**Decision:** C", "Final decision - D"

# the C/D object: the letter after decoration, "the", "strategy"/"option"/"letter", "to cooperate"
# the gap before an object: spaces, ":", a dash, a line break - not into a list ("Decision:" over "- Strategy C: ...")
_GAP = r"(?:[ \t:=]|[-–—](?=[ \t])|\n(?![ \t]*(?:[-*•+]|\d+[.)])[ \t]))*"
_LETTER = (
    _GAP + r"(?:(?:to\s+)?(?:cooperate|defect)\s*)?[*_`'\"(\[]*[ \t]*(?:the\s+)?"
    r"(?:(?:strategy|option|letter|action|choice|move|policy|approach|plan)\s+)?[*_`'\"(\[]*"
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
_ENDOWMENT = rf"(?:(?:my|the|our)\s+(?:{_MONEY}|\$\s*\d+|\d+\s+dollars)|what\s+i\s+have)"
_FRACTIONS = {"a quarter": 0.25, "one quarter": 0.25, "a third": 1 / 3, "one third": 1 / 3, "two thirds": 2 / 3,
              "three quarters": 0.75, "a fifth": 0.2, "one fifth": 0.2, "a tenth": 0.1, "one tenth": 0.1}
_QUANTITY = (r"(?:(?:only|just|exactly|precisely|about|around|roughly|approximately|a\s+total\s+of|the\s+sum\s+of"
             r"|an\s+amount\s+of|a\s+(?:contribution|donation)\s+of|all\s+(?:of\s+)?(?:my\s+|the\s+)?"
             r"|(?:my|the)\s+(?:entire|full|whole)\s+)\s*)?")
_AMOUNT = (
    _GAP + r"[*_`'\"(\[]*[ \t]*" + _QUANTITY + r"[*_`'\"(\[]*[ \t]*" + _alt(
        # a number: "$7.50", "$\boxed{7}$", "7 dollars", "7 and a half", "50 cents"
        rf"(?:\$\s*)?(?:\\boxed\{{\s*)?(?P<num>-?\d+(?:\.\d+)?){_NOT_AN_AMOUNT}{_half_more(1)}"
        rf"(?:\s*\}}?\$?\s*{_unit(1)})?",
        # a number word: "seven", "five dollars" (a unit or the end of the clause must follow), "a dollar"
        rf"(?P<word>{'|'.join(_WORDS)})\b{_half_more(2)}(?:\s+{_unit(2)}|{_CLAUSE_END})",
        rf"(?P<one>an?|a\s+single|one\s+single)\s+(?:dollar|buck|point|unit|token|coin|credit|(?P<cent>cent))\b",
        # a share of the endowment: "70% of my endowment", "a quarter of my money", "everything except $1"
        rf"(?P<pct>\d+(?:\.\d+)?)\s*(?:%|percent)\s+of\s+{_ENDOWMENT}",
        rf"(?P<frac>{_words(' '.join(f.replace(' ', '_') for f in _FRACTIONS))})\s+of\s+{_ENDOWMENT}",
        rf"(?:everything|all(?:\s+of\s+(?:it|my\s+{_MONEY}))?)\s+(?:except|but|minus|save|apart\s+from|other\s+than)"
        rf"\s+(?:for\s+)?(?:\$\s*)?(?P<except>\d+(?:\.\d+)?)\b",
        # nothing, everything, half
        r"(?P<zero>nothing|none|no\s+money|not\s+(?:a\s+)?(?:single\s+)?(?:cent|dollar|penny|thing))\b",
        rf"(?P<all>everything|it\s+all|all\s+(?:of\s+)?(?:it|(?:my|the)\s+{_MONEY})"
        rf"|(?:my|the)\s+(?:entire|full|whole)\s+(?:{_MONEY}|amount|sum)|the\s+(?:maximum|max|full\s+amount)"
        rf"|all{_CLAUSE_END})\b",
        rf"(?P<half>half)\b(?!\s+(?:a|an)\b)(?:\s+(?:of\s+)?(?:it|{_ENDOWMENT}))?",
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
_NOUN_IMPERSONAL = r"(?:choice|answer|decision|strategy|option|move|action|approach|plan|policy|course\s+of\s+action)"
# a gerund's praise: "Contributing $6 seems like a fair compromise", "Choosing C is the best option"
_PRAISE = _words("best better optimal right correct rational wise wisest smart smartest ideal sensible logical "
                 "reasonable fair good balanced safest safe prudent")
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
# "not": "I won't", "I would never"
_NEGATION = (rf"(?:won{_AP}t|will\s+not|would\s+not|wouldn{_AP}t|do\s+not|don{_AP}t|(?:am|{_AP}m)\s+not\s+going\s+to"
             rf"|shall\s+not|(?:would|will|{_AP}d|{_AP}ll)?\s*never|can{_AP}t|cannot)\s+")
# a self-correction: "Actually, D.", "On reflection: $6"
_REVISION_WORDS = (r"actually|on\s+(?:second\s+thoughts?|(?:further\s+)?reflection)|correction|scratch\s+that"
                   r"|(?:i\s+)?(?:(?:want|would\s+like|need)\s+to\s+|will\s+|['’]ll\s+)revise|changed?\s+my\s+mind"
                   r"|change\s+my\s+answer")
_REVISED = rf"\b(?:{_REVISION_WORDS})\s*[,:;—–-]?\s*"
# tier 0: self-corrections; tier 1: the player's own statements; tier 2: advice and impersonal ones (see _ranked)
_CHOICE_STATEMENTS = _compile(
    (0, "choose", [rf"{_REVISED}{_LETTER}{_LINE_END}"]),  # "C\n\nActually, D."
    (1, "refuse", [rf"{_I}{_NEGATION}{_CHOOSE_OR_PLAY}{_LETTER}"]),  # "I will not choose D": two strategies, so C
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
        rf"{_LETTER_FIRST}{_IS}what\s+{_I}{_CHAIN}{_CHOOSE_OR_PLAY}",  # "D is what I'd pick"
    ]),
    (2, "choose", [
        # advice
        rf"{_YOU}{_ADVICE}{_CHOOSE_OR_PLAY}{_LETTER}",
        r"\byou\s+" + _words("chose picked selected opted_for went_with") + _LETTER,
        # impersonal
        rf"\bthe\s+(?:{_IMPERSONAL_ADJ}\s+)?{_NOUN_IMPERSONAL}"
        rf"(?:\s+(?:for\s+me|here|for\s+us))?\s+(?:is|would\s+be|will\s+be)\s+(?:to\s+{_CHOOSE_OR_PLAY})?{_LETTER}",
        rf"\bis\s+to\s+{_CHOOSE_OR_PLAY}{_LETTER}",
        rf"\b{_IMPERSONAL_ADJ}\s+to\s+{_CHOOSE_OR_PLAY}{_LETTER}",
        rf"{_LETTER_FIRST}{_IS}{_IMPERSONAL}{_NOUN_IMPERSONAL}",
        rf"\b{_words('choosing picking selecting playing going_with opting_for sticking_with')}{_LETTER}{_PRAISED}",
    ]),
)

# the second of two coordinated verbs of one first-person subject: "I'll keep 3 [for myself] and contribute 7"
_COORDINATED = rf"{_I}{_CHAIN}(?:{_GIVE}|{_KEEP}|{_CHOOSE})[^.!?\n;]{{0,60}}?\b(?:and|then)\s+{_CHAIN}"
_INFINITIVE_GIVE = rf"(?:to\s+{_CHAIN}{_GIVE_OR_CHOOSE}(?:\s+in\b)?{_PLACE})?"
_CONTRIBUTION_STATEMENTS = _compile(
    (0, "give", [rf"{_REVISED}{_AMOUNT}{_LINE_END}"]),
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
        rf"{_AMOUNT_FIRST}{_IS}what\s+{_I}{_CHAIN}{_GIVE_OR_CHOOSE}",  # "$7 is what I'll contribute"
    ]),
    (1, "keep", [
        rf"{_I}{_CHAIN}{_KEEP}{_AMOUNT}",
        rf"{_COORDINATED}{_KEEP}{_AMOUNT}",  # "I'll contribute 7 and keep 3"
        rf"{_MY}{_ADJ}{_NOUN_CHOICE}{_PP}{_COPULA}to\s+{_CHAIN}{_KEEP}{_AMOUNT}",
    ]),
    (1, "none", [  # "I won't give anything"
        rf"{_I}{_NEGATION}{_GIVE}\s+(?:anything|any\s+money|a\s+(?:single\s+)?(?:cent|dollar|penny))\b",
    ]),
    (2, "give", [
        # advice, and the plain present ("you put $1 in the fund")
        rf"{_YOU}(?:{_ADVICE})?(?:only\s+|just\s+)?{_GIVE}{_GIVE_OBJECT}",
        rf"{_YOU}{_ADVICE}{_CHOOSE}{_AMOUNT}",
        rf"\bthe\s+amount\s+(?:that\s+)?{_YOU}{_CHAIN}{_GIVE}(?:\s+in)?{_PLACE}\s+(?:is|would\s+be|will\s+be){_AMOUNT}",
        # impersonal
        rf"\bthe\s+{_IMPERSONAL_ADJ}\s+(?:choice|decision|strategy|option|move|contribution|amount|donation"
        rf"|course\s+of\s+action|thing\s+to\s+do|approach|plan)(?:\s+(?:for\s+me|here|for\s+us))?\s+"
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
# (a clause after ", but"/";" starts afresh: "I would give $10 if ..., but since I can't, I'll give $5")
_SENTENCE_END = re.compile(r"[.!?](?!\d)|\n|;|,\s*(?:but|however|yet|instead)\b|\bbut\s+(?:since|because|given|as)\b",
                           re.I)
_SENTENCE_MAX = 400  # a conditional word further back than this does not count (keeps parsing linear in the text)
# the consequent of a conditional sentence: a comma or "then" after the condition ("If they pick D, I pick C")
_CONSEQUENT = re.compile(r",|\bthen\b", re.I)
# the rest of the clause after an object makes it conditional: "I would give $10 if the others did"
_CONDITION_AFTER = re.compile(
    r"[ \t,]*(?:(?!(?:because|since|as|so|and|but|while|which|that|given|though|although|even)\b)"
    r"[\w$'’-]+[ \t]+){0,5}?"
    r"(?:if|unless|provided|as\s+long\s+as|assuming|only\s+if|in\s+case)\b", re.I)
_QUESTION = re.compile(r"[^.!?\n]*?\?")
_PARENTHESES = re.compile(r"\([^()\n]*\)")
_REVISION = re.compile(rf"\b(?:{_REVISION_WORDS})\b", re.I)
_INSTEAD = re.compile(r"[ \t,]*instead\b", re.I)
_FINAL = re.compile(r"\bfinal\b", re.I)
CONSEQUENT = 3  # the rank of decisions in the consequent of a conditional sentence


def _ranked(statements, text: str, value) -> dict[int, list]:
    """The values of the decisive statements by rank (see the module docstring): 0 self-corrected or final, 1 the
    player's own, 2 advice and impersonal, CONSEQUENT decisions that hold only under a condition."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    conditions = [m.start() for m in _CONDITIONAL.finditer(text)]
    # a condition inside parentheses reaches no further than them: "(6 vs 4 if they choose D), so D is what I'd pick"
    closes = {}
    for p in _PARENTHESES.finditer(text):
        for j in range(bisect_right(conditions, p.start()), bisect_left(conditions, p.end())):
            closes[conditions[j]] = p.end()
    revisions = [m.start() for m in _REVISION.finditer(text)]
    ranked: dict[int, list] = {0: [], 1: [], 2: [], CONSEQUENT: []}
    for tier, kind, pattern in statements:
        for m in pattern.finditer(text):
            if _QUESTION.match(text, m.end()) or _CONDITION_AFTER.match(text, m.end()):
                continue
            begin = ends[bisect_right(ends, m.start()) - 1] if ends and ends[0] <= m.start() else 0
            begin = max(begin, m.start() - _SENTENCE_MAX)
            i = bisect_right(conditions, m.start()) - 1  # the last condition before the statement that reaches it
            while i >= 0 and conditions[i] >= begin and closes.get(conditions[i], m.start() + 1) <= m.start():
                i -= 1
            if i >= 0 and conditions[i] >= begin:
                if _CONSEQUENT.search(text, conditions[i], m.start()):
                    ranked[CONSEQUENT].append(value(kind, m))
                continue
            rank = tier
            if tier == 1 and (_FINAL.search(m.group(0)) or _INSTEAD.match(text, m.end())
                              or (revisions and revisions[0] < m.end())):
                rank = 0
            ranked[rank].append(value(kind, m))
    return ranked


def _decide(lead, ranked: dict[int, list], last):
    """One answer or None from the leading answer (value, bare) or None, the ranked statements and the last-line
    answer (a function: read only when nothing else decides)."""
    if lead is not None and lead[1]:
        if ranked[0]:
            values = set(ranked[0])  # a self-correction or final answer overrides the leading one
        elif any(v != lead[0] for v in ranked[1]):
            return None  # the player's own statements contradict the leading answer
        else:
            values = {lead[0]}
    else:
        if lead is not None:  # a leading answer that is a sentence's subject ("$0 is the rational answer")
            ranked[2].append(lead[0])
        values = next((set(ranked[r]) for r in (0, 1, 2) if ranked[r]), None)
        if values is None:
            consequent = ranked[CONSEQUENT]  # the same decision in every case considered
            values = set(consequent) if len(consequent) >= 2 else {last()}
    return values.pop() if len(values) == 1 else None


_TRACE = re.compile(r"<(think|thinking|reasoning|scratchpad)>(.*?)</\1>", re.I | re.S)
_BOXED = re.compile(r"\$?\\boxed\{\s*([^{}]*?)\s*\}\$?")
_BOLD = re.compile(r"\*\*|__")


def _normalise(text: str) -> str:
    """The visible answer: without a reasoning trace (<think>...</think>), LaTeX boxes and bold markers."""
    return _BOLD.sub("", _BOXED.sub(r"\1", _TRACE.sub("", text)))


def _last_line(text: str) -> str:
    return text.rstrip().rsplit("\n", 1)[-1]


# after a leading answer: an alternative ("C (or D)", "$5-$10", "$5 or maybe $6") or a condition ("C if ...")
# makes it no answer; a verb makes it a sentence's subject ("$0 is the rational answer", "C is better")
_LETTER_ALTERNATIVE = re.compile(
    r"[ \t*_`'\")\]]*[ \t(]*,?[ \t]*(?:and|or|vs\.?|versus|nor|/|&)[ \t]*(?:maybe\s+|perhaps\s+|possibly\s+)?"
    r"[*_`'\"(\[]*[ \t]*(?:strategy\s+|option\s+)?(?P<alt>[CD])(?![A-Za-z0-9])", re.I)
_AMOUNT_ALTERNATIVE = re.compile(
    rf"(?:[ \t]*{_UNIT_WORDS})?[ \t*_`'\")\]]*(?:[ \t]*(?:[-–—/,(]|\bor\b|\bto\b|\band\b))+[ \t]*"
    r"(?:(?:maybe|perhaps|possibly|even)[ \t]+)?[*_`'\"(\[]*[ \t]*\$?[ \t]*(?P<alt>\d+(?:\.\d+)?)", re.I)
_SUBJECT = re.compile(rf"(?:[ \t]*{_UNIT_WORDS})?[ \t*_`'\")\]]*\s+(?:is|was|would\s+be|seems|remains|looks|sounds)\b",
                      re.I)


def _lead(value, text: str, end: int, alternative: re.Pattern, same=lambda a, b: a == b):
    """(value, bare) for a leading answer that ends at `end`, or None when another answer is offered right after it
    ("C (or D)", "$5-$10"; not an apposition: "Half my endowment, $5") or a condition follows."""
    m = alternative.match(text, end)
    if (m and not same(m.group("alt"), value)) or _CONDITION_AFTER.match(text, end):
        return None
    return value, _SUBJECT.match(text, end) is None


# ---------------------------------------------------------------------------------------------------------------
# C/D

# the last line is just the letter, or ends with it after a comma/colon ("Considering everything, C."), not "C, D"
_FINAL_LETTER = re.compile(r"(?:.*(?<!\b[CD])[,:][ \t]*)?[ \t*_`'\"(\[]*([CD])[ \t*_`'\")\]]*[.!]?[ \t*]*")


def _leading_choice(text: str, start: int = 0):
    head = text[start:].lstrip(_DECORATION)
    m = _LEADING.match(head)
    if m is None:
        return None
    return _lead(m.group(1).upper(), text, len(text) - len(head) + m.end(), _LETTER_ALTERNATIVE,
                 lambda a, b: a.upper() == b)


def _letter(kind: str, m: re.Match) -> str:
    letter = m.group("letter").upper()
    if kind == "refuse":  # not D in a game of two strategies is C
        return {"C": "D", "D": "C"}.get(letter, letter)
    return letter


def _with_trace(parse):
    """`parse` reads the visible answer (_normalise); where that states none, the reasoning trace's own decision."""
    def read(text, *args):
        if not text:
            return None
        answer = parse(_normalise(text), *args)
        if answer is None and (traces := [m.group(2) for m in _TRACE.finditer(text)]):
            answer = parse(_normalise("\n".join(traces)), *args)
        return answer
    read.__doc__, read.__name__ = parse.__doc__, parse.__name__
    return read


@_with_trace
def parse_choice(text: str | None) -> str | None:
    """`C`, `D` or None (invalid). See the module docstring for the rule."""
    lead = _leading_choice(text)
    if lead is None and (speaker := _SPEAKER.match(text)):
        lead = _leading_choice(text, speaker.end())

    def last() -> str | None:
        m = _FINAL_LETTER.fullmatch(_last_line(text))
        return m.group(1) if m else None

    answer = _decide(lead, _ranked(_CHOICE_STATEMENTS, text, _letter), last)
    return answer if answer in ("C", "D") else None


# ---------------------------------------------------------------------------------------------------------------
# PGG

_FINAL_NUMBER = re.compile(r"[ \t*_`'\"(\[]*(?:\$\s*)?" + _NUMBER + r"[ \t]*\$?[ \t*_`'\")\]]*"
                           r"(?:dollars?|bucks|points?|units?|tokens?|coins?)?[ \t.!*]*", re.I)
_ENDS_CLAUSE = r"(?=[ \t*_`'\")\]]*(?:[.,;:!?\n—–-]|$))"
_AMOUNT_ENDS_CLAUSE = re.compile(rf"(?:[ \t]*{_UNIT_WORDS})?{_ENDS_CLAUSE}", re.I)
# a leading amount in words or a share ("Five dollars.", "Nothing.", "Half of my $10.", "All of it - $10!")
_LEADING_AMOUNT = re.compile(r"[\s*_`'\"(\[>#]*" + _AMOUNT + _ENDS_CLAUSE, re.I)


def _amount(m: re.Match, endowment: int) -> float:
    """The amount an _AMOUNT match names."""
    g = dict.fromkeys(("num", "word", "one", "cent", "zero", "all", "pct", "frac", "except", "half_more1",
                       "half_more2", "cents1", "cents2"))
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
    elif g["pct"] is not None:
        return endowment * float(g["pct"]) / 100
    elif g["frac"] is not None:
        return endowment * _FRACTIONS[" ".join(g["frac"].lower().split())]
    elif g["except"] is not None:
        return endowment - float(g["except"])
    else:  # half
        return endowment / 2
    if g["half_more1"] or g["half_more2"]:
        value += 0.5
    if g["cents1"] or g["cents2"]:
        value /= 100
    return value


def _same_amount(alternative: str, value: float) -> bool:
    return float(alternative) == value


def _leading_amount(text: str, endowment: int, start: int = 0):
    m = _LEADING_NUMBER.match(text[start:])
    if m is not None and (start == 0 or _AMOUNT_ENDS_CLAUSE.match(text, start + m.end())):
        return _lead(float(m.group(1)), text, start + m.end(), _AMOUNT_ALTERNATIVE, _same_amount)
    m = _LEADING_AMOUNT.match(text, start)
    if m is not None and m.group("num") is None:
        return _lead(_amount(m, endowment), text, m.end(), _AMOUNT_ALTERNATIVE, _same_amount)
    return None


@_with_trace
def parse_contribution(text: str | None, endowment: int) -> float | None:
    """A contribution in [0, endowment] (any amount, e.g. 7.5), or None (invalid). See the module docstring."""
    lead = _leading_amount(text, endowment)
    if lead is None and (speaker := _SPEAKER.match(text)):
        lead = _leading_amount(text, endowment, speaker.end())

    def value(kind: str, m: re.Match) -> float:
        if kind == "none":
            return 0.0
        amount = _amount(m, endowment)
        return endowment - amount if kind == "keep" else amount

    def last() -> float | None:
        m = _FINAL_NUMBER.fullmatch(_last_line(text))
        return float(m.group(1)) if m else None

    answer = _decide(lead, _ranked(_CONTRIBUTION_STATEMENTS, text, value), last)
    if answer is None or not 0 <= answer <= endowment:
        return None
    return answer + 0.0  # -0.0 -> 0.0

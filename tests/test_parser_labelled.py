"""The parser against hand-labelled real responses: the demo models' (`tests/data/labelled_responses.jsonl`) and
a second set in other model families' styles (`tests/data/labelled_responses_families.jsonl`).

The demo set: responses of the demo teacher (qwen2.5-coder-0.5b-instruct) and student (smollm2-135m-instruct) to the
project's own prompts, both instructions, 2x2 games and the PGG, temperature 0.8 - made by
`scripts/make_labelled_set.py` (seeded) and labelled by reading each response (by one of this project's
engineers, an AI agent, response by response - never with the parser): `label` is the choice
(C/D) or the amount the response states as the player's own decision, null when it states none or is ambiguous;
`note` says why where it was a judgement call.

Two parts: the main set (320 rows, `scripts/make_labelled_set.py --set main`), which the rule in
`shared.parsing` was written against, and a held-out part (84 rows, ids `h-...`, other scenarios and seeds) that
was labelled after the rule was written and measured before any further change: 78/84 = 92.9 %, all six misses
"invalid" where the label reads an answer in the student's garbled text; three general phrases added after that
("the answer is $0", "it is essential to choose C", "the reasoning behind the decision to choose C") give 81/84.
The grammar that replaced the phrase list (shared/parsing.py, commit 4fe608d) reads all 404 rows as the phrase
list did (318/320, 81/84).

The families set: 340 responses (200 C/D, 140 PGG; 226 with motivation, 114 answer-only) in the styles of eight
other model families (llama-3, mistral, gemma, gpt-4o, claude, phi, deepseek-r1 with <think> traces, command-r:
"As Alex, ..." openings, speaker tags, markdown, long motivations before the decision, self-corrections),
written and labelled by another engineer who had not read the rule, while the grammar was being written; the
grammar's author read it only after committing the grammar (4fe608d). Measured then, before any change:
295/340 = 86.8 % (choice 178/200, PGG 117/140; the phrase list before the grammar: 274/340 = 80.6 %). The 45
disagreements fell in these classes: a <think> trace read as the answer (9), an amount in words or a share at the
start ("Five dollars.", "**Half** of my $10.") unread (8), another answer right after the leading one ("$5-$10",
"C (or D)", "C if ..., D otherwise") (7), an explicit self-correction or final answer not preferred (4) or a
leading answer contradicted or used as a sentence's subject (2), game-theoretic descriptions read as decisions
("the dominant strategy is D") (3), the player in the third person ("Alex should contribute $10") (3),
percentages and fractions of the endowment (3), words outside the grammar ("adopt policy C", "the best approach
would be to choose") (2), "everything except $1" (1), "I will not choose D" (1), one decision under every
condition (1), a condition clause reaching past ", so" (1). The grammar was then extended in general ways, one
per class (module docstring of shared/parsing.py): 336/340 = 98.8 % (choice 198/200, PGG 138/140); the four left:
the player in the third person (3, invalid where the label reads the amount/letter) and "The optimal strategy
is C for the firms as a whole, but D for the individual firm" (label invalid, parser C). The demo set is unchanged
by these extensions (318/320, 81/84). The "after" number is not a held-out measurement any more: the extensions
were made after seeing the misses.

Checked here:
- agreement with the labels: >= 99 % on the main set, >= 95 % on the held-out part, >= 98.5 % on all demo rows
  (measured: 318/320, 81/84, 399/404 = 98.8 %), >= 98 % on the families set (measured 336/340 = 98.8 %); per
  group (model/style, instruction, kind) it is printed (groups are small, so only these bounds are asserted); and
  the parser never returns an answer other than the label's valid answer (every disagreement is "invalid"
  against a labelled answer, or the reverse) - on both sets;
- the leading-answer rule (`shared.parsing._LEADING` / `_LEADING_NUMBER`, what exact mode reads) is right
  whenever it decides on the demo set, and exact mode's own `lead_choice` / `lead_contribution` (whole-number
  grid) too; on the families set it decides 130 rows and is wrong on 11 (ranges, "C (or D)", self-corrections,
  "$0 is the individually rational answer" - the full parser reads past the first answer, exact mode cannot);
- on answer_only responses the leading rule alone and the full parser give the same answer on >= 92 % of rows
  (measured: 154/160 = 96.2 % on the main set, 195/202 = 96.5 % on all rows; the bound leaves a margin of ~9 rows).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tomtransfer.services.teacher.exact import lead_choice, lead_contribution
from tomtransfer.shared.parsing import _DECORATION, _LEADING, _LEADING_NUMBER, parse_choice, parse_contribution

DATA = Path(__file__).parent / "data" / "labelled_responses.jsonl"
FAMILIES = Path(__file__).parent / "data" / "labelled_responses_families.jsonl"
MIN_AGREEMENT = {"main": 0.99, "heldout": 0.95, "all": 0.985}
MIN_FAMILIES_AGREEMENT = 0.98
MAX_FAMILIES_LEADING_WRONG = 11  # measured (of 130 rows where the leading rule decides); see the module docstring
MIN_ANSWER_ONLY_LEAD_AGREEMENT = 0.92
FIELDS = {"id", "model", "instruction", "scenario_id", "kind", "endowment", "prompt_seed", "response", "label", "note"}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load(DATA)


@pytest.fixture(scope="module")
def family_rows() -> list[dict]:
    return load(FAMILIES)


def parsed(row: dict):
    if row["kind"] == "choice":
        return parse_choice(row["response"])
    return parse_contribution(row["response"], row["endowment"])


def leading(row: dict) -> tuple[bool, object]:
    """(decides, answer) by the parser's leading rule alone; an out-of-range leading amount decides: invalid."""
    text = row["response"]
    if row["kind"] == "choice":
        m = _LEADING.match(text.lstrip(_DECORATION))
        return (True, m.group(1).upper()) if m else (False, None)
    m = _LEADING_NUMBER.match(text)
    if not m:
        return False, None
    value = float(m.group(1))
    return True, (value if 0 <= value <= row["endowment"] else None)


def show(row: dict, got) -> str:
    text = row["response"].replace("\n", " | ")
    return f"  {row['id']}: label={row['label']!r} got={got!r} note={row['note']!r}\n      {text[:240]!r}"


def test_the_set_is_real_and_covers_both_models_instructions_and_kinds(rows):
    assert len(rows) >= 300 and sum(part(r) == "main" for r in rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == FIELDS, r["id"]
        assert r["kind"] in ("choice", "contribution")
        if r["kind"] == "choice":
            assert r["label"] in ("C", "D", None) and r["endowment"] is None, r["id"]
        else:
            assert r["label"] is None or 0 <= r["label"] <= r["endowment"], r["id"]
    for name in ("main", "heldout"):
        groups = {(r["model"], r["instruction"], r["kind"]) for r in rows if part(r) == name}
        assert groups == {(m, i, k) for m in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
                          for i in ("answer_only", "answer_motivation") for k in ("choice", "contribution")}, name
    assert sum(r["kind"] == "contribution" and part(r) == "main" for r in rows) >= 60
    # real text, with motivations: not a synthetic list of one-letter answers
    assert sum(len(r["response"]) > 100 for r in rows) >= 150


def part(row: dict) -> str:
    return "heldout" if row["id"].startswith("h-") else "main"


def test_parser_agrees_with_the_labels(rows):
    per: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    parts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong, other_answer = [], []
    for r in rows:
        got = parsed(r)
        ok = got == r["label"]
        for counts in (per[(r["model"], r["instruction"], r["kind"])], parts[part(r)], parts["all"]):
            counts[0] += 1
            counts[1] += ok
        if not ok:
            wrong.append(show(r, got))
            if got is not None and r["label"] is not None:
                other_answer.append(show(r, got))
    report = "\n".join(
        [f"  {name:8s} {a}/{n} = {a / n:.2%} (bound {MIN_AGREEMENT[name]:.1%})"
         for name, (n, a) in sorted(parts.items())]
        + [f"  {m:30s} {i:18s} {k:13s} {a}/{n} = {a / n:.1%}" for (m, i, k), (n, a) in sorted(per.items())])
    listing = "disagreements:\n" + ("\n".join(wrong) or "  none")
    print(f"\nparser vs labels:\n{report}\n{listing}")
    low = [name for name, (n, a) in parts.items() if a / n < MIN_AGREEMENT[name]]
    assert not low, f"agreement below the bound for {low}\n{report}\n{listing}"
    assert not other_answer, "the parser read another answer than the label's:\n" + "\n".join(other_answer)


def test_leading_rule_is_right_when_it_decides(rows):
    """What exact mode reads: where the leading rule decides, it agrees with the label (the parser's rule and
    exact mode's own `lead_choice` / `lead_contribution`, whose grid is whole numbers: off-grid is None there)."""
    wrong = []
    decided = 0
    for r in rows:
        decides, value = leading(r)
        if decides:
            decided += 1
            if value != r["label"]:
                wrong.append(show(r, value))
        if r["kind"] == "choice":
            exact = lead_choice(r["response"])
            if exact is not None and exact != r["label"]:
                wrong.append(show(r, f"exact {exact}"))
        else:
            exact = lead_contribution(r["response"], r["endowment"])
            if exact is not None and float(exact) != r["label"]:
                wrong.append(show(r, f"exact {exact}"))
    assert decided >= 80, decided  # the rule decides on a good part of the set (qwen follows the format)
    assert not wrong, "leading rule vs labels:\n" + "\n".join(wrong)


def test_on_answer_only_the_leading_rule_is_the_parser(rows):
    only = [r for r in rows if r["instruction"] == "answer_only"]
    differ = [show(r, f"lead {leading(r)[1]!r} parser {parsed(r)!r}") for r in only if leading(r)[1] != parsed(r)]
    share = 1 - len(differ) / len(only)
    print(f"\nanswer_only: leading rule == parser on {len(only) - len(differ)}/{len(only)} = {share:.1%}")
    assert share >= MIN_ANSWER_ONLY_LEAD_AGREEMENT, "\n".join(differ)


def test_the_families_set_covers_eight_styles_both_kinds_and_instructions(family_rows):
    assert len(family_rows) >= 300
    assert len({r["id"] for r in family_rows}) == len(family_rows)
    for r in family_rows:
        assert set(r) == FIELDS, r["id"]
        if r["kind"] == "choice":
            assert r["label"] in ("C", "D", None) and r["endowment"] is None, r["id"]
        else:
            assert r["kind"] == "contribution" and (r["label"] is None or 0 <= r["label"] <= r["endowment"]), r["id"]
    assert len({r["model"] for r in family_rows}) >= 8
    assert {(r["kind"], r["instruction"]) for r in family_rows} == {
        (k, i) for k in ("choice", "contribution") for i in ("answer_only", "answer_motivation")}
    assert sum(r["kind"] == "contribution" for r in family_rows) >= 100


def test_parser_agrees_with_the_families_labels(family_rows):
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong, other_answer = [], []
    for r in family_rows:
        got = parsed(r)
        ok = got == r["label"]
        for key in ("all", f"kind {r['kind']}", f"instruction {r['instruction']}", f"style {r['model']}",
                    f"style {r['model']} {r['kind']}"):
            groups[key][0] += 1
            groups[key][1] += ok
        if not ok:
            wrong.append(show(r, got))
            if got is not None and r["label"] is not None:
                other_answer.append(show(r, got))
    report = "\n".join(f"  {key:45s} {a}/{n} = {a / n:.1%}" for key, (n, a) in sorted(groups.items()))
    listing = "disagreements:\n" + ("\n".join(wrong) or "  none")
    print(f"\nparser vs the families labels:\n{report}\n{listing}")
    n, a = groups["all"]
    assert a / n >= MIN_FAMILIES_AGREEMENT, f"{a}/{n} below {MIN_FAMILIES_AGREEMENT:.0%}\n{report}\n{listing}"
    assert not other_answer, "the parser read another answer than the label's:\n" + "\n".join(other_answer)


def test_leading_rule_on_the_families_set(family_rows):
    """Exact mode reads only the leading answer: on the families set it is wrong where another answer, a condition
    or a self-correction follows it (the full parser reads those); the count is the measured one."""
    decided, wrong = 0, []
    for r in family_rows:
        decides, value = leading(r)
        decided += decides
        if decides and value != r["label"]:
            wrong.append(show(r, value))
    print(f"\nfamilies: leading rule decides {decided}, wrong on {len(wrong)}:\n" + "\n".join(wrong))
    assert len(wrong) <= MAX_FAMILIES_LEADING_WRONG, "\n".join(wrong)

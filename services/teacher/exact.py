"""Exact mode: answer probabilities at temperature T from forward passes, with no sampling noise.

Definition (what the numbers mean)
----------------------------------
Sample a response token by token from softmax(logits / T) (top_p = 1, no penalties) after the
chat-templated prompt, until an end-of-sequence token. Its *leading answer* is what `shared.parsing`'s
first rule reads from the response text:

- choice (2x2 games): strip leading decoration (whitespace, `*_\\`'"()[]{}<>#~`), then an optional
  word `answer|choice|decision|strategy|option|letter` and separator, then a standalone C or D (not
  followed by a letter/digit, and not "C and D"/"C or D"/"C/D"...). Case-insensitive, as the parser.
- contribution (PGG): the amount at the very start (after `\\s*_\\`'"([` and an optional `$`), unless it
  starts arithmetic ("4.5 * 10", "10 x 2.5", "2 + 3", "10 \\times 2.5") or a percentage; exact mode's
  answers are the whole numbers 0..endowment ("5.0" counts as 5; "11" is invalid).
  Amounts between whole numbers: the paper's PGG is continuous and the full parser accepts any amount
  in [0, endowment] ("7.5" -> 7.5), but exact mode keeps its whole-number grid (a distribution over
  the 0..endowment answers, the same for every engine). A leading "7.5" is decided as *not a grid
  answer* and counted in `invalid_mass`, so for the PGG `invalid_mass` = no leading amount, out of
  range, or off the grid. Nothing is rounded, so `p[a]` stays exact for every grid answer and
  `1 - valid_mass` still bounds the difference from sampling + full parsing; a model that often answers
  "7.5" shows it as a large `invalid_mass` (then sample and parse instead of trusting exact numbers).

`p[a]` is the probability that the response's leading answer is `a`; `valid_mass = sum(p)`;
`invalid_mass` is the probability that the response provably has no leading answer (it starts with
something else, e.g. "Sure, ..." or "I choose C"); `unresolved_mass` is what the expansion below did
not decide (mass below `min_mass`, deeper than `max_depth`, or outside the explored part of a
distribution). `valid + invalid + unresolved = 1` up to float rounding. The full parser also accepts
answers stated later in a response (rule 2/3 of `parse_choice`, "contribute 7" in a PGG answer), so
`1 - valid_mass` bounds how far free-form sampling + full parsing can differ from these numbers.

How it is computed
------------------
A short deterministic expansion of the token tree. The root is the next-token distribution after the
prompt (one prefill). Every token whose text already decides the leading answer ("C.", " D", "**C**",
"Sure") is classified at once; tokens whose text could still become either ("**", " ", "C" (might
continue as "Cooperate"), "1" (might become "10"), "Answer") are expanded: all such prefixes of one
depth are scored together in one batched forward pass over the shared prompt cache. A prefix is
*decided* when the rule gives the same result for it followed by each of a set of adversarial
continuations (end of text, a letter, a digit, " and D", ", C", completions of a partial keyword or
"and"/"or", ".5", ...), see `ChoiceRule.probes`; the tests check this against the parser on random
strings. A token that ends the response (EOS) decides with the rule applied to the final text.
At the root the whole vocabulary is classified (cached per tokenizer and rule); deeper, the most
likely tokens covering all but `min_mass` of the node's mass are classified and the rest counts as
unresolved. Typical cost: one prefill + one or two small batched steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tomtransfer.shared.parsing import _DECORATION, _LEADING, _LEADING_NUMBER  # the parser's own leading rules

UNDECIDED = "?"
INVALID = None

_KEYWORDS = ("answer", "choice", "decision", "strategy", "option", "letter")
_CONJ = ("and", "or")
_CHOICE_BASE_PROBES = (
    "", " ", "x", "X", "0", ".", ",", ":", "C", "D", "c", "d", " C", " D", ": C", ": D", ":C", "-C", "=D",
    " and C", " and D", " or C", " or D", " & C", " & D", "&C", "&D", "/C", "/D", ",C", ",D", ", C", ", D",
    "\nC", "\nD", " x", "**", "\n",
)
_CHOICE_FIRST = set("acdslo:-=")
_NUM_PROBES = ("", "x", " ", "0", "5", "9", ".", ".5", ".0", "$", " 5", ",", "\n",
               # continuations that make a leading number the start of arithmetic or a percentage (not an answer)
               "*", " *", "* 2", " * 2", "**", "=", " =", "/", "+", " +", "×", "≈", "^", "%", " %",
               "x5", " x 5", "x 5",
               "\\times", " \\times", "\\cdot", " \\cdot")
_NUM_WORDS = ("\\times", "\\cdot")  # partial LaTeX operators ("10 \\ti") are completed by the probes
_NUM_LEAD_STRIP = " \t\r\n*_`'\"(["


def lead_choice(text: str) -> str | None:
    """Rule 1 of shared.parsing.parse_choice only: the leading C/D, or None."""
    m = _LEADING.match(text.lstrip(_DECORATION))
    return m.group(1).upper() if m else None


def lead_contribution(text: str, endowment: int) -> str | None:
    """The leading whole number in 0..endowment (as a string), or None: also None for a leading amount off the
    whole-number grid ("7.5"), which the full parser reads as 7.5 (see the module docstring)."""
    m = _LEADING_NUMBER.match(text)
    if not m:
        return None
    value = float(m.group(1))
    if not value.is_integer() or not 0 <= value <= endowment:
        return None
    return str(int(value))


class ChoiceRule:
    kind = "choice"

    def answers(self) -> list[str]:
        return ["C", "D"]

    def key(self) -> str:
        return "choice"

    def final(self, text: str) -> str | None:
        return lead_choice(text)

    def probes(self, head: str) -> list[str]:
        probes = list(_CHOICE_BASE_PROBES)
        low = head.lower()
        for word in _KEYWORDS + _CONJ:
            for i in range(1, len(word)):
                if low.endswith(word[:i]):
                    rest = word[i:]
                    probes += [rest, rest + " C", rest + " D", rest + ": C", rest + "C"]
        return probes

    def status(self, text: str, final: bool = False) -> str | None:
        """"C"/"D" (decided), None (decided: no leading answer) or UNDECIDED."""
        if final:
            return lead_choice(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: decided only if the text before it is
            base = text.rstrip("\ufffd")
            return self.status(base) if base.lstrip(_DECORATION).strip() else UNDECIDED
        head = text.lstrip(_DECORATION)
        h2 = head.lstrip()
        if not h2:
            return UNDECIDED
        if h2[0].lower() not in _CHOICE_FIRST:
            return INVALID
        outcomes = {lead_choice(text + u) for u in self.probes(head)}
        return outcomes.pop() if len(outcomes) == 1 else UNDECIDED


class ContributionRule:
    kind = "contribution"

    def __init__(self, endowment: int):
        if endowment < 0:
            raise ValueError("endowment must be >= 0")
        self.endowment = endowment

    def answers(self) -> list[str]:
        return [str(i) for i in range(self.endowment + 1)]

    def key(self) -> str:
        return f"contribution:{self.endowment}"

    def final(self, text: str) -> str | None:
        return lead_contribution(text, self.endowment)

    def status(self, text: str, final: bool = False) -> str | None:
        if final:
            return lead_contribution(text, self.endowment)
        if text.endswith("\ufffd"):
            base = text.rstrip("\ufffd")
            return self.status(base) if base.lstrip(_NUM_LEAD_STRIP) else UNDECIDED
        h = text.lstrip(_NUM_LEAD_STRIP)
        if not h:
            return UNDECIDED
        if h[0] != "$" and not h[0].isdigit():
            # unicode digits are not [0-9] for the parser's purposes unless \d matches them: ask the rule. A minus
            # sign can still lead to a valid answer: "-0" (and "-0.0") parse as 0.
            if all(lead_contribution(text + d, self.endowment) is None for d in ("5", "0", *self.probes(text))):
                return INVALID
            return UNDECIDED
        outcomes = {lead_contribution(text + u, self.endowment) for u in self.probes(text)}
        return outcomes.pop() if len(outcomes) == 1 else UNDECIDED

    def probes(self, text: str) -> list[str]:
        probes = list(_NUM_PROBES)
        for word in _NUM_WORDS:
            for i in range(1, len(word)):
                if text.endswith(word[:i]):
                    probes += [word[i:], word[i:] + " 2"]
        return probes


def make_rule(kind: str, endowment: int = 10):
    if kind == "choice":
        return ChoiceRule()
    if kind == "contribution":
        return ContributionRule(endowment)
    raise ValueError(f"unknown exact kind {kind!r}; expected 'choice' or 'contribution'")


# ------------------------------------------------------------------------------------- expansion
class TreeBackend(Protocol):
    """What the expansion needs from a model. Rows are the current frontier, in order."""

    def root_logits(self) -> torch.Tensor:  # (V,) next-token logits after the prompt
        ...

    def advance(self, parent_rows: list[int], tokens: list[int]) -> torch.Tensor:
        """New frontier: row i = parent row parent_rows[i] (of the previous frontier; the root is row 0
        of an implicit one-row frontier) followed by tokens[i]. Returns next-token logits (K, V)."""
        ...


@dataclass
class TokenTable:
    """Per-tokenizer facts the expansion needs (computed once per engine)."""

    texts: list[str]  # decode([id]) for every id < model vocab (ids beyond the tokenizer: "")
    end_ids: frozenset[int]  # tokens that end a response (EOS set)
    n_real: int  # ids >= n_real do not exist in the tokenizer (padded embedding rows): invalid

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, end_ids) -> "TokenTable":
        n_real = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n_real)], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        texts += [""] * (vocab_size - n_real)
        return cls(texts=texts, end_ids=frozenset(int(i) for i in end_ids), n_real=n_real)


def probs_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64; T == 0 is greedy (all mass on the argmax)."""
    logits = logits.double()
    if temperature <= 0:
        p = torch.zeros_like(logits)
        p.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return p
    return torch.softmax(logits / temperature, dim=-1)


class RootClassifier:
    """Caches the root-level classification of the whole vocabulary per rule."""

    def __init__(self, table: TokenTable):
        self.table = table
        self._cache: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def classify(self, rule) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(undecided_ids, invalid_mask, {answer: ids}) for single tokens at the start of a response."""
        key = rule.key()
        if key not in self._cache:
            t = self.table
            V = len(t.texts)
            invalid = torch.zeros(V, dtype=torch.bool)
            undecided: list[int] = []
            by_answer: dict[str, list[int]] = {a: [] for a in rule.answers()}
            for i, text in enumerate(t.texts):
                if i >= t.n_real:
                    invalid[i] = True
                    continue
                s = rule.status("", final=True) if i in t.end_ids else rule.status(text)
                if s is UNDECIDED:
                    undecided.append(i)
                elif s is None:
                    invalid[i] = True
                else:
                    by_answer[s].append(i)
            self._cache[key] = (torch.tensor(undecided, dtype=torch.long), invalid,
                                {a: torch.tensor(v, dtype=torch.long) for a, v in by_answer.items()})
        und, inv, by = self._cache[key]
        return und, inv, by


_STATUS_CACHE: dict[tuple, object] = {}
_STATUS_CACHE_MAX = 200_000


def _status(rule, text: str, final: bool = False):
    """rule.status, memoised per (rule, text): the same leading texts ("**", " C", "Answer") recur across calls and
    scenarios, and each check runs dozens of probe regexes."""
    key = (rule.key(), text, final)
    s = _STATUS_CACHE.get(key, _STATUS_CACHE)
    if s is _STATUS_CACHE:
        if len(_STATUS_CACHE) >= _STATUS_CACHE_MAX:
            _STATUS_CACHE.clear()
        s = _STATUS_CACHE[key] = rule.status(text, final=final)
    return s


def decode_many(tokenizer, seqs: list[list[int]]) -> list[str]:
    """`batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)`, straight through the
    Rust backend of a fast tokenizer when there is one: an expansion step decodes hundreds of short sequences, and
    transformers' per-sequence Python checks cost ~4 ms of a 30 ms GPU call (profiled on an H200)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return backend.decode_batch(seqs, skip_special_tokens=True)
    return tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@dataclass
class _Node:
    ids: list[int]
    text: str
    mass: float


def expand(rule, backend: TreeBackend, table: TokenTable, root: RootClassifier, tokenizer, temperature: float,
           *, min_mass: float = 1e-6, max_depth: int = 8, max_width: int = 64,
           max_children: int = 512) -> tuple[dict[str, float], float, float, int, list[dict]]:
    """Run the expansion; returns (p, invalid_mass, unresolved_mass, forward_passes, top_tokens)."""
    p = {a: 0.0 for a in rule.answers()}
    invalid = 0.0
    unresolved = 0.0
    root_p = probs_at(backend.root_logits().float().cpu(), temperature)
    und_ids, inv_mask, by_answer = root.classify(rule)
    for a, ids in by_answer.items():
        if len(ids):
            p[a] += float(root_p[ids].sum())
    invalid += float(root_p[inv_mask].sum())
    top_tokens = []
    for prob, tid in zip(*torch.topk(root_p, min(10, root_p.numel()))):
        tid = int(tid)
        st = _status(rule, "", final=True) if tid in table.end_ids else _status(rule, table.texts[tid])
        top_tokens.append({"token": table.texts[tid], "id": tid, "p": float(prob),
                           "decides": "undecided" if st is UNDECIDED else st})
    frontier: list[_Node] = []
    parents: list[int] = []
    if len(und_ids):
        # the most likely undecided tokens with at least min_mass start the frontier; the rest is unresolved
        und_p = root_p[und_ids]
        order = torch.argsort(und_p, descending=True)
        top = order[:max_width]
        top = top[und_p[top] >= min_mass]
        unresolved += float(und_p.sum() - und_p[top].sum())
        for tid, m in zip(und_ids[top].tolist(), und_p[top].tolist()):
            frontier.append(_Node([tid], table.texts[tid], m))
            parents.append(0)
    passes = 1
    depth = 1
    while frontier:
        if depth >= max_depth:
            unresolved += sum(n.mass for n in frontier)
            break
        logits = backend.advance(parents, [n.ids[-1] for n in frontier])
        passes += 1
        # all rows at once, where the logits are (the GPU on CUDA): softmax, each row's most likely children until
        # all but min_mass of its mass is covered; only (rows, k) values and ids come back to the host
        probs = probs_at(logits.float(), temperature)
        mass = torch.tensor([n.mass for n in frontier], dtype=probs.dtype, device=probs.device)
        k = min(max_children, probs.shape[-1])
        vals_all, idx_all = torch.topk(probs * mass.unsqueeze(1), k, dim=-1)
        csum = torch.cumsum(vals_all, -1)
        keeps = (torch.searchsorted(csum, (mass - min_mass).unsqueeze(1)).squeeze(1) + 1).clamp_(1, k)
        ghost = idx_all >= table.n_real  # ids the tokenizer does not have: invalid answers
        in_keep = torch.arange(k, device=probs.device).unsqueeze(0) < keeps.unsqueeze(1)
        ghost_mass = torch.where(ghost & in_keep, vals_all, torch.zeros_like(vals_all)).sum(-1)
        kept_sum = torch.where(in_keep, vals_all, torch.zeros_like(vals_all)).sum(-1)
        # one device -> host transfer for the per-row numbers, one for the candidates
        ghost_mass, kept_sum, keeps = torch.stack((ghost_mass, kept_sum, keeps.to(ghost_mass.dtype))).cpu().tolist()
        vals_all, idx_all, ghost = vals_all.cpu(), idx_all.cpu(), ghost.cpu()
        kids: list[tuple[list[float], list[int]]] = []
        real: list[tuple[int, int]] = []  # (row, token) pairs whose text is needed
        for row, node in enumerate(frontier):
            keep = int(keeps[row])
            unresolved += max(0.0, node.mass - kept_sum[row])
            invalid += ghost_mass[row]
            sel = ~ghost[row, :keep]
            vals, idx = vals_all[row, :keep][sel].tolist(), idx_all[row, :keep][sel].tolist()
            kids.append((vals, idx))
            real += [(row, t) for t in idx if t not in table.end_ids]
        # every child's text from one tokenizer call (decoding ids + [t], not texts[t]: byte-level pieces merge)
        texts = dict(zip(real, decode_many(tokenizer, [frontier[r].ids + [t] for r, t in real])))
        candidates: list[_Node] = []
        cand_parents: list[int] = []
        for row, (node, (vals, idx)) in enumerate(zip(frontier, kids)):
            for m, t in zip(vals, idx):
                if t in table.end_ids:
                    s = _status(rule, node.text, final=True)
                    text = node.text
                else:
                    text = texts[(row, t)]
                    s = _status(rule, text)
                if s is UNDECIDED:
                    candidates.append(_Node(node.ids + [t], text, m))
                    cand_parents.append(row)
                elif s is None:
                    invalid += m
                else:
                    p[s] += m
        order = sorted(range(len(candidates)), key=lambda i: -candidates[i].mass)
        frontier, parents = [], []
        for i in order:
            c = candidates[i]
            if c.mass < min_mass or len(frontier) >= max_width:
                unresolved += c.mass
                continue
            frontier.append(c)
            parents.append(cand_parents[i])
        depth += 1
    return p, invalid, unresolved, passes, top_tokens



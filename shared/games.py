"""Games as data: 2x2 symmetric payoff matrices and the n-player public-goods game.

Everything the prompts say about a game is rendered from its numbers, so a doubled game
(every payoff x 2, the paper's out-of-sample "games") is the same code with another matrix.
Game-theoretic facts (pure Nash equilibria, Pareto-optimal outcomes, the dilemma class) are
computed from the payoffs, never typed in by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import product

ACTIONS = ("C", "D")
Outcome = tuple[str, str]  # (your action, coplayer's action)

# The four canonical games of the paper (payoffs: you, coplayer).
CANONICAL_PAYOFFS: dict[str, dict[Outcome, tuple[int, int]]] = {
    "prison": {("C", "C"): (5, 5), ("C", "D"): (2, 10), ("D", "C"): (10, 2), ("D", "D"): (3, 3)},
    "staghunt": {("C", "C"): (10, 10), ("C", "D"): (2, 5), ("D", "C"): (5, 2), ("D", "D"): (3, 3)},
    "snowdrift": {("C", "C"): (5, 5), ("C", "D"): (3, 10), ("D", "C"): (10, 3), ("D", "D"): (2, 2)},
    "delight": {("C", "C"): (10, 10), ("C", "D"): (3, 5), ("D", "C"): (5, 3), ("D", "D"): (2, 2)},
}

DILEMMA_LABELS = {
    "prisoners_dilemma": "Prisoner's Dilemma",
    "stag_hunt": "Stag Hunt",
    "snowdrift": "Snowdrift (Chicken)",
    "harmony": "Harmony (Prisoner's Delight)",
    "other": "other 2x2 game",
}


@dataclass(frozen=True)
class Game:
    """A symmetric two-player, two-action game. `payoffs[(a, b)] = (yours, coplayer's)`."""

    id: str
    payoffs: dict[Outcome, tuple[float, float]]
    name: str = ""
    # Verbatim text (e.g. imported from the paper's repository); None = rendered from the payoffs.
    text: str | None = None

    def __post_init__(self) -> None:
        missing = [o for o in product(ACTIONS, ACTIONS) if o not in self.payoffs]
        if missing:
            raise ValueError(f"game {self.id!r}: payoffs missing for outcomes {missing}")
        for (a, b), (mine, theirs) in self.payoffs.items():
            if self.payoffs[(b, a)] != (theirs, mine):
                raise ValueError(f"game {self.id!r}: payoffs are not symmetric at {a}{b}/{b}{a}")

    # --- ordinal shorthand (R reward, S sucker, T temptation, P punishment) -------------------
    @property
    def R(self) -> float:
        return self.payoffs[("C", "C")][0]

    @property
    def S(self) -> float:
        return self.payoffs[("C", "D")][0]

    @property
    def T(self) -> float:
        return self.payoffs[("D", "C")][0]

    @property
    def P(self) -> float:
        return self.payoffs[("D", "D")][0]

    def scaled(self, factor: float, suffix: str | None = None) -> "Game":
        """Every payoff x factor; the paper's out-of-sample games use factor 2 (id suffix `_x2`)."""
        suffix = suffix if suffix is not None else f"_x{_fmt(factor)}"
        payoffs = {o: (_num(p[0] * factor), _num(p[1] * factor)) for o, p in self.payoffs.items()}
        text = _scale_text(self.text, factor) if self.text is not None else None
        return Game(id=self.id + suffix, payoffs=payoffs, name=self.name, text=text)

    def render(self, closing: str = "") -> str:
        """The user-facing description of the payoffs, one sentence per outcome."""
        if self.text is not None:
            return self.text
        cc, cd, dc, dd = (self.payoffs[o] for o in (("C", "C"), ("C", "D"), ("D", "C"), ("D", "D")))
        body = (
            f"If you choose C and your coplayer also chooses C, you will both earn {_fmt(cc[0])} points. "
            f"If you choose C while your coplayer chooses D, you will earn {_fmt(cd[0])} points "
            f"and your coplayer will earn {_fmt(cd[1])} points. "
            f"If you choose D while your coplayer chooses C, you will earn {_fmt(dc[0])} points "
            f"and your coplayer will earn {_fmt(dc[1])} points. "
            f"If you choose D and your coplayer also chooses D, you will both earn {_fmt(dd[0])} points."
        )
        return f"{body} {closing}".strip()


@dataclass(frozen=True)
class GameAnalysis:
    pure_nash: tuple[Outcome, ...]
    pareto_optimal: tuple[Outcome, ...]
    dominant_action: str | None
    dilemma: str  # key of DILEMMA_LABELS

    @property
    def is_social_dilemma(self) -> bool:
        """Some Nash equilibrium is not Pareto-optimal: individual and collective interest diverge."""
        return any(ne not in self.pareto_optimal for ne in self.pure_nash) or self.dilemma in (
            "stag_hunt",
            "snowdrift",
        )


def best_responses(game: Game, coplayer_action: str) -> set[str]:
    values = {a: game.payoffs[(a, coplayer_action)][0] for a in ACTIONS}
    top = max(values.values())
    return {a for a, v in values.items() if v == top}


def pure_nash_equilibria(game: Game) -> tuple[Outcome, ...]:
    # Symmetric game: the coplayer's best responses are the same function with roles swapped.
    return tuple(
        (a, b) for a, b in product(ACTIONS, ACTIONS) if a in best_responses(game, b) and b in best_responses(game, a)
    )


def pareto_optimal_outcomes(game: Game) -> tuple[Outcome, ...]:
    def dominated(o: Outcome) -> bool:
        mine, theirs = game.payoffs[o]
        return any(
            (p[0] >= mine and p[1] >= theirs) and (p[0] > mine or p[1] > theirs) for p in game.payoffs.values()
        )

    return tuple(o for o in product(ACTIONS, ACTIONS) if not dominated(o))


def dominant_action(game: Game) -> str | None:
    for a in ACTIONS:
        other = "D" if a == "C" else "C"
        if all(game.payoffs[(a, b)][0] > game.payoffs[(other, b)][0] for b in ACTIONS):
            return a
    return None


def classify(game: Game) -> str:
    """The dilemma class from the ordinal payoff structure (Rapoport-Guyer style, symmetric games)."""
    R, S, T, P = game.R, game.S, game.T, game.P
    if T > R > P > S:
        return "prisoners_dilemma"
    if R > T >= P > S:
        return "stag_hunt"
    if T > R > S > P:
        return "snowdrift"
    if R > T and S > P:
        return "harmony"
    return "other"


def analyze(game: Game) -> GameAnalysis:
    return GameAnalysis(
        pure_nash=pure_nash_equilibria(game),
        pareto_optimal=pareto_optimal_outcomes(game),
        dominant_action=dominant_action(game),
        dilemma=classify(game),
    )


@dataclass(frozen=True)
class PublicGoodsGame:
    """n-player linear public-goods game: contributions x multiplier, split equally among all players."""

    id: str = "pgg"
    players: int = 4
    endowment: int = 10
    multiplier: float = 2.5
    you: str = "Alex"
    others: tuple[str, ...] = field(default=("Taylor", "Jordan", "Casey"))
    name: str = "Public Goods Game"

    def __post_init__(self) -> None:
        if self.players < 2 or self.endowment < 1 or self.multiplier <= 0:
            raise ValueError("public-goods game needs players >= 2, endowment >= 1, multiplier > 0")
        if len(self.others) != self.players - 1:
            raise ValueError(f"public-goods game: {self.players} players need {self.players - 1} other names")

    @property
    def mpcr(self) -> Fraction:
        """Marginal per-capita return: what one contributed unit gives back to its contributor."""
        return Fraction(str(self.multiplier)) / self.players

    def payoff(self, mine: int, others_total: int) -> float:
        return self.endowment - mine + self.multiplier * (mine + others_total) / self.players

    @property
    def nash_contribution(self) -> int:
        # Each unit contributed returns mpcr < 1 to its giver: free-riding is dominant.
        return 0 if self.mpcr < 1 else self.endowment

    @property
    def social_optimum_contribution(self) -> int:
        return self.endowment if self.multiplier > 1 else 0

    @property
    def is_social_dilemma(self) -> bool:
        return self.mpcr < 1 < self.multiplier

    def scaled(self, factor: float) -> "PublicGoodsGame":
        return PublicGoodsGame(
            id=f"{self.id}_x{_fmt(factor)}",
            players=self.players,
            endowment=int(self.endowment * factor),
            multiplier=self.multiplier,
            you=self.you,
            others=self.others,
            name=self.name,
        )


def canonical_games() -> dict[str, Game]:
    names = {
        "prison": "Prisoner's Dilemma",
        "staghunt": "Stag Hunt",
        "snowdrift": "Snowdrift",
        "delight": "Prisoner's Delight",
    }
    return {gid: Game(id=gid, payoffs=dict(p), name=names[gid]) for gid, p in CANONICAL_PAYOFFS.items()}


_PAYOFF_SENTENCE = re.compile(
    r"If you choose (?P<a>[CD]) (?:and|while) your coplayer (?:also )?chooses (?P<b>[CD]), "
    r"you will (?:both earn (?P<both>\d+(?:\.\d+)?) points?"
    r"|earn (?P<mine>\d+(?:\.\d+)?) points? and your coplayer will earn (?P<theirs>\d+(?:\.\d+)?) points?)"
)


def parse_payoff_text(text: str) -> dict[Outcome, tuple[float, float]]:
    """Read the payoff matrix back from game text in the paper's wording (used by the importer)."""
    payoffs: dict[Outcome, tuple[float, float]] = {}
    for m in _PAYOFF_SENTENCE.finditer(text):
        if m["both"] is not None:
            v = _num(float(m["both"]))
            payoffs[(m["a"], m["b"])] = (v, v)
        else:
            payoffs[(m["a"], m["b"])] = (_num(float(m["mine"])), _num(float(m["theirs"])))
    missing = [o for o in product(ACTIONS, ACTIONS) if o not in payoffs]
    if missing:
        raise ValueError(f"could not read the payoffs of outcomes {missing} from the game text")
    return payoffs


def _scale_text(text: str, factor: float) -> str:
    # Imported verbatim texts are scaled in place: only numbers followed by "point(s)" change.
    return re.sub(
        r"(\d+(?:\.\d+)?)(\s+points?)", lambda m: f"{_fmt(_num(float(m[1]) * factor))}{m[2]}", text
    )


def _num(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"

"""What a scenario catalog is: contexts, scenarios (a context x a game, in one of the paper's families) and the
catalog that holds them. The built-in 53 are in `shared.scenarios`, user packs in `shared.packs`; both build on
these types, and `shared.scenarios.build_catalog` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tomtransfer.shared.config import Family
from tomtransfer.shared.games import Game, PublicGoodsGame

FAMILIES: tuple[Family, ...] = ("in_sample", "oos_context", "oos_game", "pgg")


@dataclass(frozen=True)
class Context:
    id: str
    text: str
    canonical: bool = True  # False: out-of-sample context (never seen in training)


@dataclass(frozen=True)
class Scenario:
    id: str
    family: Family
    context: Context
    game: Game | PublicGoodsGame
    game_id: str  # the base game id (`prison`, ..., `pgg`), unscaled
    payoff_scale: float = 1.0

    @property
    def is_pgg(self) -> bool:
        return isinstance(self.game, PublicGoodsGame)

    def summary(self) -> dict:
        return {
            "id": self.id,
            "family": self.family,
            "context": self.context.id,
            "game": self.game_id,
            "payoff_scale": self.payoff_scale,
            "kind": "pgg" if self.is_pgg else "2x2",
        }


@dataclass(frozen=True)
class Catalog:
    contexts: dict[str, Context]
    games: dict[str, Game]
    scenarios: dict[str, Scenario]

    def select(self, families: list[str] | None = None, ids: list[str] | None = None) -> list[Scenario]:
        if ids:
            unknown = [i for i in ids if i not in self.scenarios]
            if unknown:
                raise KeyError(f"unknown scenario id(s): {', '.join(unknown)}")
            return [self.scenarios[i] for i in ids]
        fams = set(families or FAMILIES)
        return [s for s in self.scenarios.values() if s.family in fams]

    def merged(self, other: "Catalog") -> "Catalog":
        """This catalog plus a pack's; ids in `other` must not shadow ours (silent overrides hide mistakes)."""
        for kind, mine, theirs in (
            ("context", self.contexts, other.contexts),
            ("game", self.games, other.games),
            ("scenario", self.scenarios, other.scenarios),
        ):
            clash = sorted(set(mine) & set(theirs))
            if clash:
                raise ValueError(f"{kind} id(s) already defined: {', '.join(clash)}")
        return Catalog(
            contexts={**self.contexts, **other.contexts},
            games={**self.games, **other.games},
            scenarios={**self.scenarios, **other.scenarios},
        )


def make_2x2(family: Family, context: Context, game: Game, scale: float = 1.0) -> Scenario:
    played = game if scale == 1 else game.scaled(scale)
    sid = f"{context.id}_{played.id}"
    return Scenario(id=sid, family=family, context=context, game=played, game_id=game.id, payoff_scale=scale)

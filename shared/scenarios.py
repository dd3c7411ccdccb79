"""Scenarios: a social context x a game, grouped in the paper's four families.

Catalog (53 scenarios):
  in_sample    20  canonical context x canonical game          id `{context}_{game}`
  oos_context  12  out-of-sample context x canonical game     id `{context}_{game}`
  oos_game     20  canonical context x doubled game           id `{context}_{game}_x2`
  pgg           1  4-player public-goods game, dorm-party fund id `pgg`
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from shared.config import Family
from shared.games import Game, PublicGoodsGame, canonical_games

CANONICAL_CONTEXTS = ("IR", "biz", "environment", "team", "friendsharing")
OOS_CONTEXTS = ("sports", "ventcap", "roomsharing")
GAME_IDS = ("prison", "staghunt", "snowdrift", "delight")
PGG_CONTEXT = "dormparty"
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


def read_context_text(context_id: str) -> str:
    return resources.files("shared").joinpath("data", "contexts", f"{context_id}.txt").read_text()


def make_2x2(family: Family, context: Context, game: Game, scale: float = 1.0) -> Scenario:
    played = game if scale == 1 else game.scaled(scale)
    sid = f"{context.id}_{played.id}"
    return Scenario(id=sid, family=family, context=context, game=played, game_id=game.id, payoff_scale=scale)


@cache
def default_catalog() -> Catalog:
    contexts = {cid: Context(cid, read_context_text(cid), canonical=True) for cid in CANONICAL_CONTEXTS}
    contexts |= {cid: Context(cid, read_context_text(cid), canonical=False) for cid in OOS_CONTEXTS}
    contexts[PGG_CONTEXT] = Context(PGG_CONTEXT, read_context_text(PGG_CONTEXT), canonical=False)
    games = canonical_games()
    scenarios: list[Scenario] = []
    scenarios += [make_2x2("in_sample", contexts[c], games[g]) for c in CANONICAL_CONTEXTS for g in GAME_IDS]
    scenarios += [make_2x2("oos_context", contexts[c], games[g]) for c in OOS_CONTEXTS for g in GAME_IDS]
    scenarios += [make_2x2("oos_game", contexts[c], games[g], 2) for c in CANONICAL_CONTEXTS for g in GAME_IDS]
    pgg = PublicGoodsGame()
    scenarios.append(Scenario(id="pgg", family="pgg", context=contexts[PGG_CONTEXT], game=pgg, game_id="pgg"))
    return Catalog(contexts=contexts, games=games, scenarios={s.id: s for s in scenarios})


def build_catalog(pack_paths: list | tuple = ()) -> Catalog:
    """The built-in catalog plus any scenario packs (see `shared.packs`)."""
    from shared.packs import load_pack  # local import: packs depend on this module

    catalog = default_catalog()
    for path in pack_paths:
        catalog = catalog.merged(load_pack(path, base=catalog))
    return catalog

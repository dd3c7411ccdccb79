"""Scenarios: a social context x a game, grouped in the paper's four families.

Catalog (53 scenarios):
  in_sample    20  canonical context x canonical game          id `{context}_{game}`
  oos_context  12  out-of-sample context x canonical game     id `{context}_{game}`
  oos_game     20  canonical context x doubled game           id `{context}_{game}_x2`
  pgg           1  4-player public-goods game, dorm-party fund id `pgg`
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from tomtransfer.shared.catalog import FAMILIES, Catalog, Context, Scenario, make_2x2  # noqa: F401  (re-exported)
from tomtransfer.shared.games import PublicGoodsGame, canonical_games
from tomtransfer.shared.packs import load_pack

CANONICAL_CONTEXTS = ("IR", "biz", "environment", "team", "friendsharing")
OOS_CONTEXTS = ("sports", "ventcap", "roomsharing")
GAME_IDS = ("prison", "staghunt", "snowdrift", "delight")
PGG_CONTEXT = "dormparty"


def read_context_text(context_id: str) -> str:
    return resources.files("tomtransfer.shared").joinpath("data", "contexts", f"{context_id}.txt").read_text()


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
    catalog = default_catalog()
    for path in pack_paths:
        catalog = catalog.merged(load_pack(path, base=catalog))
    return catalog

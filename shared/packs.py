"""Scenario packs: user-defined contexts, games and scenarios in YAML, validated with clear errors.

```yaml
contexts:
  - id: hospital                 # letters, digits, '-', '_'
    text: "You are the head of ..."
    canonical: false             # false = an out-of-sample context
games:
  - id: chicken
    name: Chicken
    payoffs: {CC: [5, 5], CD: [3, 10], DC: [10, 3], DD: [2, 2]}   # (yours, coplayer's)
    text: null                   # optional verbatim text; default: rendered from payoffs
scenarios:
  - {context: hospital, game: prison, family: oos_context}        # id defaults to hospital_prison
  - {context: hospital, game: chicken, family: oos_game, scale: 2}  # id hospital_chicken_x2
```
Scenarios may use the pack's own contexts/games and the built-in ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tomtransfer.shared.errors import UserError
from tomtransfer.shared.games import Game
from tomtransfer.shared.catalog import Catalog, Context, Scenario, make_2x2

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PackError(UserError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContextSpec(_Strict):
    id: str = Field(pattern=_ID)
    text: str = Field(min_length=0)
    canonical: bool = False


class GameSpec(_Strict):
    id: str = Field(pattern=_ID)
    name: str = ""
    payoffs: dict[Literal["CC", "CD", "DC", "DD"], tuple[float, float]]
    text: str | None = None

    @field_validator("payoffs")
    @classmethod
    def _complete(cls, v: dict) -> dict:
        missing = sorted({"CC", "CD", "DC", "DD"} - set(v))
        if missing:
            raise ValueError(f"missing outcome(s) {', '.join(missing)}")
        return v


class ScenarioSpec(_Strict):
    context: str
    game: str
    family: Literal["in_sample", "oos_context", "oos_game"]
    scale: float = Field(default=1.0, gt=0)
    id: str | None = Field(default=None, pattern=_ID)


class PackSpec(_Strict):
    contexts: list[ContextSpec] = Field(default_factory=list)
    games: list[GameSpec] = Field(default_factory=list)
    scenarios: list[ScenarioSpec] = Field(default_factory=list)


def pack_from_data(data: object, source: str, base: Catalog) -> Catalog:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PackError(f"{source}: a scenario pack is a mapping with contexts/games/scenarios")
    try:
        spec = PackSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PackError(f"{source}: {where}: {first['msg']}") from None

    contexts = {c.id: Context(c.id, c.text, canonical=c.canonical) for c in spec.contexts}
    games: dict[str, Game] = {}
    for g in spec.games:
        try:
            games[g.id] = Game(
                id=g.id, name=g.name or g.id, text=g.text, payoffs={(k[0], k[1]): tuple(v) for k, v in g.payoffs.items()}
            )
        except ValueError as err:
            raise PackError(f"{source}: games: {err}") from None
    for kind, ids in (("context", [c.id for c in spec.contexts]), ("game", [g.id for g in spec.games])):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise PackError(f"{source}: duplicate {kind} id(s): {', '.join(dup)}")

    scenarios: dict[str, Scenario] = {}
    for i, s in enumerate(spec.scenarios):
        ctx = contexts.get(s.context) or base.contexts.get(s.context)
        game = games.get(s.game) or base.games.get(s.game)
        if ctx is None:
            raise PackError(f"{source}: scenarios.{i}: unknown context {s.context!r}")
        if game is None:
            raise PackError(f"{source}: scenarios.{i}: unknown game {s.game!r}")
        scen = make_2x2(s.family, ctx, game, s.scale)
        if s.id:
            scen = Scenario(s.id, scen.family, scen.context, scen.game, scen.game_id, scen.payoff_scale)
        if scen.id in scenarios:
            raise PackError(f"{source}: duplicate scenario id {scen.id!r}")
        scenarios[scen.id] = scen
    pack = Catalog(contexts=contexts, games=games, scenarios=scenarios)
    try:
        base.merged(pack)  # reject clashes with the base catalog now, with the pack's name on the error
    except ValueError as err:
        raise PackError(f"{source}: {err}") from None
    return pack


def load_pack(path: str | Path, base: Catalog) -> Catalog:
    path = Path(path)
    if not path.is_file():
        raise PackError(f"scenario pack not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise PackError(f"{path}: invalid YAML") from None
    return pack_from_data(data, str(path), base)


def dump_pack(contexts: list[Context], games: list[Game], scenarios: list[dict]) -> str:
    """YAML for a pack. Texts are double-quoted so every byte (CR, trailing spaces) round-trips."""

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = '"' if ("\n" in value or "\r" in value or value != value.strip()) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    data = {
        "contexts": [{"id": c.id, "text": c.text, "canonical": c.canonical} for c in contexts],
        "games": [
            {
                "id": g.id,
                "name": g.name,
                "payoffs": {f"{a}{b}": list(p) for (a, b), p in g.payoffs.items()},
                "text": g.text,
            }
            for g in games
        ],
        "scenarios": scenarios,
    }
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=10**9)

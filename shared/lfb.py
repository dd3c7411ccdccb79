"""Import the paper's repository layout (github: "LFB"-style folders) as a scenario pack.

  data/context/*.txt     canonical contexts  -> in_sample scenarios (x every game)
  new contexts/*.txt     out-of-sample contexts -> oos_context scenarios
  data/game/*.txt        games (payoffs read from the text; the text itself kept verbatim)

Texts are kept byte for byte (CRLF, trailing spaces and all); the doubled games of the oos_game
family are the same texts with every payoff x 2. An empty context file (the paper's
`no-context.txt`) is kept: it is a meaningful control, a game with no social framing.
"""

from __future__ import annotations

from pathlib import Path

from tomtransfer.shared.errors import UserError
from tomtransfer.shared.games import Game, parse_payoff_text
from tomtransfer.shared.scenarios import Context


def _read(path: Path) -> str:
    # newline="" keeps CRLF as found; the files are UTF-8 (ASCII in practice).
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def read_lfb(root: str | Path, prefix: str = "") -> tuple[list[Context], list[Game], list[dict]]:
    root = Path(root)
    ctx_dir, new_dir, game_dir = root / "data" / "context", root / "new contexts", root / "data" / "game"
    for d in (ctx_dir, game_dir):
        if not d.is_dir():
            raise UserError(f"{root}: not the paper's layout (missing folder {d.relative_to(root)})")
    contexts = [Context(prefix + p.stem, _read(p), canonical=True) for p in sorted(ctx_dir.glob("*.txt"))]
    if new_dir.is_dir():
        contexts += [Context(prefix + p.stem, _read(p), canonical=False) for p in sorted(new_dir.glob("*.txt"))]
    games = []
    for p in sorted(game_dir.glob("*.txt")):
        text = _read(p)
        try:
            payoffs = parse_payoff_text(text)
        except ValueError as err:
            raise UserError(f"{p}: {err}") from None
        games.append(Game(id=prefix + p.stem, payoffs=payoffs, name=p.stem, text=text))
    if not contexts or not games:
        raise UserError(f"{root}: found {len(contexts)} contexts and {len(games)} games; need at least one of each")
    scenarios = []
    for c in contexts:
        for g in games:
            # ids as the paper names them (`team_prison`, `team_prison_x2`), prefixed once
            sid = f"{c.id}_{g.id.removeprefix(prefix)}"
            if c.canonical:
                scenarios.append({"id": sid, "context": c.id, "game": g.id, "family": "in_sample"})
                scenarios.append({"id": sid + "_x2", "context": c.id, "game": g.id, "family": "oos_game", "scale": 2})
            else:
                scenarios.append({"id": sid, "context": c.id, "game": g.id, "family": "oos_context"})
    return contexts, games, scenarios

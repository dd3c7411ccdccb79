"""Generate the real model responses behind `tests/data/labelled_responses.jsonl` (the parser's labelled set).

What it samples (seeded, reproducible on the same model files / torch / CPU):
  models        the demo teacher (`qwen2.5-coder-0.5b-instruct`) and student (`smollm2-135m-instruct`)
  instructions  `answer_only` and `answer_motivation` (`shared.prompts.build_messages`)
  scenarios     2x2: `TWO_BY_TWO` below, 15 scenarios of `default_catalog()` mixing the three 2x2 families,
                all 8 contexts and all 4 games, 4 responses each;
                PGG: the catalog's `pgg` (the only PGG scenario), 20 responses
  sampling      the project's transformers engine on CPU, temperature 0.8, top_p 1, max_tokens 64 (answer_only)
                or 96 (answer_motivation, so motivations show); one call per (model, instruction, scenario) with
                n samples and seed `prompt_seed` (sample i of a call depends only on (seed, max_tokens, model))
That is 2 x 2 x (15 x 4 + 20) = 320 rows, 80 of them PGG (`--set main`).

`--set heldout` samples a second, smaller set the same way from 8 OTHER 2x2 scenarios (`HELDOUT_2X2`, 2 responses
each) and the PGG (5 responses), with other seeds: 2 x 2 x (8 x 2 + 5) = 84 rows, ids prefixed `h-`. It was labelled
after the parser rule had been written against the main set, and the parser measured on it before any further change
(see tests/test_parser_labelled.py), so it shows how the rule does on responses it was not written against.

Rows: {id, model, instruction, scenario_id, kind ("choice"|"contribution"), endowment (PGG, else null), prompt_seed,
response, label, note}. This script writes `label: null, note: "UNLABELLED"`; the labels in the test data were then
set BY HAND, reading each response (what choice / amount does the model state as its own decision? null = none or
ambiguous), never with the parser. `--labels OLD.jsonl` carries labels over from a labelled file for rows whose
id and response are unchanged (so a re-run shows which responses changed; changed rows need reading again).

Note: the prompts are whatever `shared.prompts` / the context files say at generation time; the set in tests/data
was made with the continuous PGG instruction ("any amount in dollars from 0 to 10. Start your answer with the
amount.") while the dorm-party context text still said "any whole amount from $0 to $10". Re-running after a prompt
change gives different responses (they need labelling again); `--scenarios`/`--instructions` re-run a part, and
`--labels` shows which rows kept their response.

Usage:  .venv/bin/python scripts/make_labelled_set.py --out /tmp/main.jsonl [--set heldout] [--labels tests/data/labelled_responses.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"qwen2.5-coder-0.5b-instruct": "qwen", "smollm2-135m-instruct": "smol"}
INSTRUCTIONS = ("answer_only", "answer_motivation")
TWO_BY_TWO = (
    # in_sample: canonical context x canonical game
    "IR_prison", "biz_staghunt", "environment_snowdrift", "team_delight", "friendsharing_prison",
    # oos_context: out-of-sample context x canonical game
    "sports_staghunt", "ventcap_snowdrift", "roomsharing_delight", "sports_prison", "ventcap_delight",
    # oos_game: canonical context x doubled game
    "IR_snowdrift_x2", "biz_prison_x2", "environment_delight_x2", "team_staghunt_x2", "friendsharing_snowdrift_x2",
)
HELDOUT_2X2 = (
    "IR_staghunt", "environment_prison", "roomsharing_prison", "sports_snowdrift",
    "ventcap_staghunt", "biz_delight_x2", "team_prison_x2", "friendsharing_staghunt_x2",
)
PGG = ("pgg",)
SETS = {  # name: (2x2 scenarios, responses per 2x2 scenario, PGG responses, id prefix)
    "main": (TWO_BY_TWO, 4, 20, ""),
    "heldout": (HELDOUT_2X2, 2, 5, "h-"),
}
TEMPERATURE = 0.8
MAX_TOKENS = {"answer_only": 64, "answer_motivation": 96}


def seed_of(model: str, instruction: str, scenario_id: str, prefix: str = "") -> int:
    """A stable per-call seed (not Python's salted hash)."""
    h = hashlib.sha256(f"{prefix}{model}|{instruction}|{scenario_id}".encode()).hexdigest()
    return int(h[:8], 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", default=None, help="a labelled file whose labels to carry over (same id+response)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--set", choices=sorted(SETS), default="main")
    ap.add_argument("--scenarios", nargs="*", default=None, help="only these scenario ids (to spot-check a re-run)")
    ap.add_argument("--instructions", nargs="*", default=list(INSTRUCTIONS), choices=INSTRUCTIONS)
    args = ap.parse_args()

    import asyncio

    import torch

    torch.set_num_threads(args.threads)
    from tomtransfer.services.common.models import resolve_model
    from tomtransfer.services.teacher.engines.base import SamplingParams
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
    from tomtransfer.shared.config import ModelSpec
    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import default_catalog

    old = {}
    if args.labels:
        for line in Path(args.labels).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                old[r["id"]] = r
    catalog = default_catalog().scenarios
    two_by_two, samples_2x2, samples_pgg, prefix = SETS[args.set]
    rows = []
    for model in args.models:
        eng = TransformersEngine(ModelSpec(model=str(resolve_model(model)), device="cpu", max_batch_size=32))
        try:
            for instruction in args.instructions:
                for sid in two_by_two + PGG:
                    if args.scenarios is not None and sid not in args.scenarios:
                        continue
                    s = catalog[sid]
                    n = samples_pgg if s.is_pgg else samples_2x2
                    seed = seed_of(model, instruction, sid, prefix)
                    ids = eng.prompt_ids(tuple(build_messages(s, instruction)))
                    t0 = time.perf_counter()
                    res = eng.sample_ids(ids, SamplingParams(n=n, temperature=TEMPERATURE, top_p=1.0,
                                                             max_tokens=MAX_TOKENS[instruction], seed=seed))
                    print(f"{model} {instruction} {sid}: {n} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                    for i, c in enumerate(res.choices):
                        rid = f"{prefix}{MODELS[model]}-{instruction}-{sid}-{i}"
                        row = {"id": rid, "model": model, "instruction": instruction, "scenario_id": sid,
                               "kind": "contribution" if s.is_pgg else "choice",
                               "endowment": s.game.endowment if s.is_pgg else None, "prompt_seed": seed,
                               "response": c.text, "label": None, "note": "UNLABELLED"}
                        prev = old.get(rid)
                        if prev is not None and prev["response"] == c.text:
                            row["label"], row["note"] = prev["label"], prev["note"]
                        rows.append(row)
        finally:
            asyncio.run(eng.close())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Offline stand-ins for tests and benchmarks of the trainer. Nothing here touches a hub.

- `fake_samples(...)`: rows in the generate stage's sample schema (`dataset.SAMPLE_COLUMNS`) for real
  catalog scenarios and their real prompts; responses are canned "answer + motivation" texts with a chosen
  C-rate and invalid rate, and `answer`/`valid` come from `shared.parsing`, as the generate stage does.
- `bench_student_dir(out_dir)`: a Llama-2-7B-shaped student folder (config + tokenizer, no weights) for the
  GPU benchmark (`random_init: true` in the loop config draws the weights on the device).
Tiny random-weight students for tests come from `services.common.tiny`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_MOTIVATIONS = [
    "My coplayer faces the same payoffs, so I expect a symmetric choice and pick the option that does best against it.",
    "Choosing this protects me against the worst outcome while keeping a good joint payoff possible.",
    "The highest total score comes from mutual cooperation, and I trust the coplayer to see that too.",
    "Whatever the coplayer does, this option gives me at least as many points, so it is the safe choice.",
    "Since we cannot communicate, I weigh the risk of being exploited against the gain from coordination.",
]


def scenario_texts() -> list[str]:
    """Every built-in scenario's prompt texts (both instructions): filler text for long motivations."""
    from shared.prompts import build_messages
    from shared.scenarios import build_catalog

    texts = []
    for s in build_catalog().scenarios.values():
        for instruction in ("answer_motivation", "answer_only"):
            texts += [m["content"] for m in build_messages(s, instruction)]
    return texts + _MOTIVATIONS


def fake_samples(
    scenario_ids: list[str] | None = None,
    *,
    families: list[str] | None = None,
    n: int = 10,
    c_rate: float | dict[str, float] = 0.7,
    invalid_rate: float = 0.1,
    seed: int = 0,
    teacher: str = "fake-teacher",
    run_id: str = "gen-test",
    motivation_words: int = 0,
):
    """Samples in the generate stage's schema. `c_rate` per scenario id may be given as a dict.
    `motivation_words` > 0 pads each motivation to about that many words (long sequences for benchmarks)."""
    import pandas as pd

    from shared.parsing import parse_choice, parse_contribution
    from shared.prompts import build_messages
    from shared.scenarios import build_catalog

    catalog = build_catalog()
    scenarios = catalog.select(families, scenario_ids)
    rng = random.Random(seed)
    filler = " ".join(scenario_texts()[:4]).split()
    rows = []
    for s in scenarios:
        msgs = build_messages(s, "answer_motivation")
        p_c = c_rate.get(s.id, 0.5) if isinstance(c_rate, dict) else c_rate
        for i in range(n):
            why = rng.choice(_MOTIVATIONS)
            if motivation_words:
                start = rng.randrange(len(filler))
                why += " " + " ".join((filler * 2)[start : start + motivation_words])
            if rng.random() < invalid_rate:
                response = "It is hard to say; both options have merit. " + why
            elif s.is_pgg:
                response = f"{rng.randint(0, s.game.endowment)}\nI contribute this much. {why}"
            else:
                letter = "C" if rng.random() < p_c else "D"
                response = f"{letter}\n{why}"
            if s.is_pgg:
                parsed = parse_contribution(response, s.game.endowment)
                answer = None if parsed is None else f"{parsed:g}"
            else:
                answer = parse_choice(response)
            rows.append({
                "run_id": run_id, "model": teacher, "scenario_id": s.id, "family": s.family,
                "context": s.context.id, "game": s.game_id, "sample_index": i, "seed": seed * 100_000 + i,
                "messages": json.dumps(msgs), "response": response, "answer": answer,
                "valid": answer is not None, "latency_s": 0.01, "prompt_tokens": 300,
                "completion_tokens": len(response.split()),
            })
    return pd.DataFrame(rows)


def bench_student_dir(out_dir: str | Path, *, vocab_size: int = 4000) -> Path:
    """A Llama-2-7B-shaped student with no weights: `services.common.tiny`'s trained tokenizer (ChatML) and
    `llama2_7b_config()`; train it with `random_init: true` (weights are drawn on the device)."""
    from services.common.tiny import llama2_7b_config, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save_pretrained(out)
    cfg = llama2_7b_config()
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tok.pad_token_id
    cfg.save_pretrained(out)
    return out
